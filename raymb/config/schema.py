"""The JSON Schema of a config file, which editors check a TOML file against
(`raymb config-schema`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, NoDefault

from raymb.config.config import Config


class _TomlSchema(GenerateJsonSchema):
    """pydantic's JSON Schema, for TOML: there is no null (an optional key is left out, or
    unset with "" or "none"), and the lists' defaults are written out."""

    def nullable_schema(self, schema: Any) -> dict[str, Any]:
        inner = self.generate_inner(schema["schema"])
        return self.get_union_of_schemas([inner, {"enum": ["", "none"]}])

    def get_default_value(self, schema: Any) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not dataclasses.is_dataclass(factory):
            return factory()
        default = super().get_default_value(schema)
        return NoDefault if default is None else default


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a config file: editors check a TOML file whose first line is
    `#:schema ./raymb.schema.json` against it (unknown keys, types, bounds)."""
    schema = TypeAdapter(Config).json_schema(schema_generator=_TomlSchema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
