"""Writing a config: the resolved config as TOML (`raymb train --print-config`), every key
of its sections written out (an unset one commented out), a note where a value gives up a
promise or was chosen for the user.
"""

from __future__ import annotations

from typing import Any

from raymb.config.config import Config
from raymb.errors import ConfigError


def to_toml(config: Config) -> str:
    """The resolved config as TOML; unset keys appear commented out."""
    lines: list[str] = []
    notes = _notes(config)
    for section, table in config.to_dict().items():
        _toml_table(section, table, notes, lines)
    return "\n".join(lines)


def _notes(config: Config) -> dict[str, str]:
    """Where a value gives up a promise, or was chosen for the user, --print-config says so."""
    notes = {}
    if getattr(config.model, "norm", None) == "batch":
        notes["model.norm"] = (
            "BatchNorm's statistics depend on how a step is cut into microbatches: the "
            'equivalence contract holds with norm = "group", not with batch'
        )
    if config.train.noise_scale and not _noise_measurable(config):
        notes["train.noise_scale"] = (
            "one worker with one microbatch a step has no second batch size: no estimate is "
            "reported (use 2+ workers, or train.microbatch_size below the global batch)"
        )
    if config.data.val is None and config.checkpoint.metric == "train_loss":
        notes["checkpoint.metric"] = "no data.val: the default val_loss needs a validation set"
    return notes


def _noise_measurable(config: Config) -> bool:
    """Whether a step has two batch sizes to compare: 2+ workers, or 2+ microbatches."""
    if config.scale.max_workers > 1:
        return True
    G, m = config.train.global_batch_size, config.microbatch()
    return m is not None and (G == "all" or m < G)


def _toml_table(name: str, table: dict[str, Any], notes: dict[str, str], lines: list[str]) -> None:
    lines.append(f"[{name}]")
    nested = {k: v for k, v in table.items() if isinstance(v, dict)}
    for key, value in table.items():
        if key in nested:
            continue
        try:
            line = f"# {key} = (unset)" if value is None else f"{key} = {toml_value(value)}"
        except ValueError as e:
            raise ConfigError(f"{name}.{key}={value!r} cannot be written as TOML: {e}") from None
        note = notes.get(f"{name}.{key}")
        lines.append(line if note is None else f"{line}  # {note}")
    lines.append("")
    for key, value in nested.items():
        _toml_table(f"{name}.{key}", value, notes, lines)


def toml_value(value: Any) -> str:
    """A value as TOML writes it: a string escaped, a list of values, true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table ([tune.space]'s distributions)
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


_TOML_ESCAPES = {
    "\\": "\\\\",
    '"': '\\"',
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_char(c: str) -> str:
    """One character of a TOML basic string: control, format and line-separator characters
    escaped, so a value with a newline stays on its line and reads back the same."""
    if c in _TOML_ESCAPES:
        return _TOML_ESCAPES[c]
    if 0xD800 <= ord(c) < 0xE000:  # a byte that was not UTF-8 (surrogateescape): no TOML
        raise ValueError("not UTF-8 text")
    if c.isprintable():
        return c
    return f"\\u{ord(c):04X}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08X}"
