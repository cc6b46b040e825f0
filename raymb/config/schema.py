"""The config's schema, two ways: the JSON Schema editors check a TOML file against
(`raymb config-schema`), and docs/config.md, every section and key with its type, default and
docstring (`python -m raymb.config > docs/config.md`).
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import PydanticUndefined

from raymb.config.build import bounds, describe, one_of
from raymb.config.config import Config
from raymb.config.model import FACTORY, FAMILIES, NAMES, LinearModel
from raymb.config.toml import toml_value


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


# ---------------------------------------------------------------- docs/config.md

HEADER = """\
# Configuration

<!-- Generated from raymb/config/ by `python -m raymb.config > docs/config.md`: edit the
docstrings there and regenerate; tests/unit/config/test_config_docs.py checks this
file is current. -->

A config file is TOML, one table per section, and every key is optional: `raymb train --config
FILE`. `--set section.key=value` overrides a key (`--set train.early_stopping.patience=3`),
`raymb train --print-config` prints the resolved config, and `raymb config-schema` writes the
JSON Schema that editors check a file against. TOML has no null: an optional key is unset with
`""` or `"none"`. A mistake (an unknown key, a wrong type, a value out of bounds) is a one-line
error naming the key, before anything starts.

Each key: its type, its default, what it does."""


def markdown() -> str:
    """docs/config.md: every section and key of the config, from the sections' fields."""
    from raymb.config.tune import TuneSection

    fields = Config.__pydantic_fields__
    names = [*fields, "tune"]
    index = "Sections: " + ", ".join(f"[[{n}]](#{n})" for n in names) + "."
    lines = [HEADER, "", _wrap(index), ""]
    for name, f in fields.items():
        if one_of(f) is not None:
            _model(name, f, lines)
        else:
            _section(name, f.annotation, lines)
    _section("tune", TuneSection, lines)  # a sweep's, read by raymb tune (docs/tune.md)
    return "\n".join(lines).rstrip() + "\n"


def _section(name: str, cls: type, lines: list[str]) -> None:
    lines += [f"## [{name}]", "", _wrap(_text(cls.__doc__)), ""]
    tables = []
    for key, f in cls.__pydantic_fields__.items():
        if dataclasses.is_dataclass(f.annotation):
            tables.append((f"{name}.{key}", f.annotation))
        else:
            lines.append(_key(key, f))
    lines.append("")
    for inner, table in tables:
        _section(inner, table, lines)


def _model(name: str, f: Any, lines: list[str]) -> None:
    """[model]: model.name, then each family's keys under the name that chooses it."""
    lines += [f"## [{name}]", "", _wrap(_text(f.description)), ""]
    chooser = LinearModel.__pydantic_fields__["name"]
    lines += [_key("name", chooser, kind=NAMES), ""]
    for cls in FAMILIES.values():
        keys = cls.__pydantic_fields__
        tag = keys["name"].default
        tag = FACTORY if tag is PydanticUndefined else tag
        lines += [f'### name = "{tag}"', "", _wrap(_text(cls.__doc__)), ""]
        lines += [_key(key, k) for key, k in keys.items() if key != "name"]
        lines.append("")


def _key(key: str, f: Any, kind: str | None = None) -> str:
    """One key as a list item: `key` = default (its type): what it does."""
    kind = kind or " ".join(filter(None, [describe(f.annotation), bounds(f)]))
    if f.default_factory is not None:
        default = f"`{toml_value(f.default_factory())}`"
    elif f.default is PydanticUndefined:
        default = "required"
    elif f.default is None:
        default = "unset"
    else:
        default = f"`{toml_value(f.default)}`"
    return _wrap(f"`{key}` = {default} ({kind}): {_text(f.description)}", "- ", "  ")


def _text(doc: str | None) -> str:
    """A docstring as one line of Markdown text (the caller wraps it)."""
    return " ".join((doc or "").split()).replace("\\", "\\\\").replace("*", "\\*")


def _wrap(text: str, first: str = "", rest: str = "") -> str:
    """`text` wrapped at 100 columns, no line starting with what Markdown would read as a
    list item, a heading or a quote (such a word stays on the line before)."""
    words: list[str] = []
    for word in text.split():
        if words and _BLOCK.match(word):
            words[-1] += "\0" + word  # \0: not a space, so never a line break
        else:
            words.append(word)
    lines = textwrap.wrap(
        " ".join(words),
        width=100,
        initial_indent=first,
        subsequent_indent=rest,
        break_long_words=False,
        break_on_hyphens=False,
    )
    return "\n".join(lines).replace("\0", " ")


_BLOCK = re.compile(r"^([-+*=>#|]|\d+[.)])")
