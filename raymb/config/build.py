"""The pydantic plumbing under every section: `section` makes a class a strict, frozen,
keyword-only pydantic dataclass; `build` makes one from its TOML table; and whatever pydantic
finds wrong becomes a one-line ConfigError naming the key and the value it got.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, Union

from annotated_types import Interval
from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass

from raymb.errors import ConfigError

T = TypeVar("T")

Fraction = Annotated[float, Interval(ge=0, lt=1)]

# What the numbers are handed to can take: the worker seeds torch with seed * 1000 + rank
# (at most 2**64 - 1), and a seed stays exact as a JSON or TensorBoard float (2**53 - 1);
# epochs x steps per epoch (up to 2**32 of them) and the step counter stay in an int64.
MAX_SEED = 2**53 - 1
MAX_EPOCHS = 2**31 - 1
MAX_STEPS = 2**63 - 1
_LIMITS = {MAX_SEED, MAX_EPOCHS, MAX_STEPS}


def section(
    where: str, *, chosen_by: str | None = None, **config: Any
) -> Callable[[type[T]], type[T]]:
    """A config section named `where`: a frozen, keyword-only pydantic dataclass whose
    ValidationErrors become one-line ConfigErrors, however it is built. `chosen_by`: the key
    that chose this class among the section's forms ([model]'s name), named by the error
    for a key the class does not take."""

    def make(cls: type[T]) -> type[T]:
        # strict: no "5" for 5 and no true for 1 (an int is still taken for a float); extra:
        # an unknown key is an error; no inf or nan in any float (none has a use for them);
        # the docstring under a field describes it in the schema.
        checked = ConfigDict(
            strict=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True
        )
        cls = dataclass(frozen=True, kw_only=True, config=ConfigDict(**checked, **config))(cls)
        cls.__chosen_by__ = chosen_by
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: T, **values: Any) -> None:
            try:
                init(self, **values)
            except ValidationError as e:
                raise _error(cls, where, values, e.errors()[0]) from None

        cls.__init__ = __init__
        return cls

    return make


@dataclasses.dataclass(frozen=True)
class OneOf:
    """Annotated metadata of a section that takes one of several forms (a discriminated
    union, such as [model]): `choose(table)` is the class a TOML table is built as."""

    choose: Callable[[dict[str, Any]], type]


def one_of(field_info: Any) -> OneOf | None:
    """The OneOf of a pydantic field, None for a field of one type."""
    return next((m for m in getattr(field_info, "metadata", ()) if isinstance(m, OneOf)), None)


def build(cls: type, table: Any, where: str) -> Any:
    """A section from its TOML table (`where` its dotted name), its own tables first."""
    if not isinstance(table, dict):
        name = where if "." in where else f"[{where}]"
        raise ConfigError(f"{name} must be a table of keys (got {table!r})")
    fields = cls.__pydantic_fields__
    values = {}
    for key, value in table.items():
        f = fields.get(key)
        tp = f.annotation if f is not None else None
        forms = one_of(f)
        inner = f"{where}.{key}".lstrip(".")
        if forms is not None:  # not a table: build says so before choosing
            value = build(forms.choose(value) if isinstance(value, dict) else tp, value, inner)
        elif dataclasses.is_dataclass(tp):
            value = build(tp, value, inner)
        elif value in ("", "none") and type(None) in typing.get_args(tp):
            value = None  # TOML has no null: an optional key is unset with "" or none
        values[key] = value
    return cls(**values)


# ---------------------------------------------------------------- one-line errors

_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _error(cls: type, where: str, values: dict[str, Any], error: Any) -> ConfigError:
    """The first error pydantic found, in one line that names the key and the value."""
    key = error["loc"][0]
    fields = cls.__pydantic_fields__
    if error["type"] == "unexpected_keyword_argument":
        key = key if str(key).isprintable() else repr(key)  # a key read from TOML: one line
        if not where:
            return ConfigError(f"unknown config section [{key}]; known: {', '.join(fields)}")
        by = cls.__chosen_by__
        if by is not None:
            chosen = values.get(by, fields[by].default)
            keys = ", ".join(k for k in fields if k != by)
            return ConfigError(
                f"{where}.{key} is not a key of {where}.{by} = {chosen!r} (its keys: {keys})"
            )
        return ConfigError(
            f"unknown config key {where}.{key}; known in [{where}]: {', '.join(fields)}"
        )
    if error["type"] == "missing":  # only a custom factory's model.name has no default
        return ConfigError(f"{where}.{key} must be set".lstrip("."))
    f = fields[key]
    bound = error["type"].startswith(("greater_than", "less_than"))
    ((side, limit),) = error["ctx"].items() if bound else [(None, None)]
    if error["type"] == "finite_number":
        what = _finite(f)
    elif bound and limit in _LIMITS:  # name the limit of torch or the step counter crossed
        what = f"{_BOUNDS[side]} {limit}"
    elif bound:
        what = bounds(f)
    else:
        what = describe(f.annotation)
    return ConfigError(f"{where}.{key} must be {what} (got {values[key]!r})".lstrip("."))


def _finite(f: Any) -> str:
    """What a float field that got inf or nan takes: 'a finite number > 0', ..."""
    if typing.get_origin(_unwrap(f.annotation)) is list:
        return "a list of finite numbers"
    within = bounds(f)
    return f"a finite number {within}" if within else "a finite number"


def _unwrap(tp: Any) -> Any:
    """The type of an optional field, without None."""
    args = [t for t in typing.get_args(tp) if t is not type(None)]
    optional = typing.get_origin(tp) in (Union, types.UnionType)
    return args[0] if optional and len(args) == 1 else tp


def bounds(f: Any) -> str:
    """A field's bounds in words: '> 0', 'in [0, 1)'; '' for none. A limit of what torch and
    the step counter take is left out (it is named only when a value crosses it)."""
    meta = [*f.metadata]
    for tp in typing.get_args(f.annotation):  # an optional field: Annotated inside the union
        meta += getattr(tp, "__metadata__", ())
    found = {
        k: getattr(m, k)
        for m in meta
        for k in _BOUNDS
        if getattr(m, k, None) is not None and getattr(m, k) not in _LIMITS
    }
    if not found:
        return ""
    if len(found) == 1:
        ((k, v),) = found.items()
        return f"{_BOUNDS[k]} {v}"
    lo = f"[{found['ge']}" if "ge" in found else f"({found['gt']}"
    hi = f"{found['le']}]" if "le" in found else f"{found['lt']})"
    return f"in {lo}, {hi}"


def describe(tp: Any) -> str:
    """A field's type in words, for the 'must be' of an error."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp) or origin is dict:
        return "a table of keys"
    if origin is Annotated:
        return describe(args[0])
    if origin is Literal:
        return repr(args[0]) if len(args) == 1 else "one of " + ", ".join(map(repr, args))
    if origin is list:
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}[args[0]]
    if origin in (Union, types.UnionType):  # the forms of [model] all read "a table of keys"
        words = dict.fromkeys(describe(t) for t in args if t is not type(None))
        return " or ".join(words)
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def require(ok: bool, key: str, what: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {what} (got {got!r})")
