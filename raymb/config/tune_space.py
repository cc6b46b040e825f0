"""A sweep's space, one dimension a key: `[tune.space]`'s values, a grid's list or a
distribution (uniform, loguniform, randint, choice), checked as they are read
(raymb.config.tune builds the sweep from them)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from raymb.errors import ConfigError

FIXED = ("run.name", "run.storage_path", "data.fold", "data.folds")
"""Keys a sweep sets itself: the trials' run directories and their cross-validation folds."""

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")


@dataclass(frozen=True)
class Dimension:
    """One key of [tune.space]: `kind` is "grid" (a list), or a distribution's name."""

    key: str
    kind: str
    values: tuple

    def draw(self, rng: random.Random) -> Any:
        """A value as a random search draws it (the checks' draws; Ray Tune draws its own)."""
        if self.kind in ("grid", "choice"):
            return rng.choice(self.values)
        low, high = self.values
        if self.kind == "uniform":
            return rng.uniform(low, high)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        return rng.randrange(low, high)

    def edges(self) -> list[Any]:
        """The values a check must try: every listed value, or a range's two ends."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        low, high = self.values
        return [low, high - 1] if self.kind == "randint" else [low, high]


def parse_dimension(key: Any, value: Any, search: str) -> Dimension:
    """One [tune.space] entry, its key checked to be a config key the sweep may set."""
    where = f"tune.space.{key!r}" if not _plain_key(key) else f'tune.space."{key}"'
    if not _plain_key(key):
        raise ConfigError(f'{where}: expected a config key such as "optim.lr" (section.key)')
    if key in FIXED:
        raise ConfigError(f"{where}: a sweep sets {key} itself; it cannot be searched")
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where} is an empty list: give at least one value")
        return Dimension(key, "grid", tuple(value))
    if not isinstance(value, dict) or len(value) != 1:
        raise ConfigError(
            f"{where}: expected a list of values or one distribution, "
            f"{{ {' | '.join(DISTRIBUTIONS)} = [...] }} (got {value!r})"
        )
    ((kind, args),) = value.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(
            f"{where}: unknown distribution {kind!r}; known: {', '.join(DISTRIBUTIONS)}"
        )
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: choice takes a non-empty list of values (got {args!r})")
        return Dimension(key, "grid" if search == "grid" else "choice", tuple(args))
    if search == "grid":
        raise ConfigError(
            f'{where}: a {kind} distribution needs tune.search = "random" or "optuna" '
            "(a grid takes a list of values)"
        )
    number = int if kind == "randint" else (int, float)
    ok = (
        isinstance(args, list)
        and len(args) == 2
        and all(isinstance(a, number) and not isinstance(a, bool) for a in args)
        and all(math.isfinite(a) for a in args)
        and args[0] < args[1]
    )
    if not ok:
        what = "two integers" if kind == "randint" else "two numbers"
        raise ConfigError(
            f"{where}: {kind} takes [low, high], {what} with low < high (got {args!r})"
        )
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"{where}: loguniform needs bounds > 0 (got {args!r})")
    return Dimension(key, kind, (args[0], args[1]))


def _plain_key(key: Any) -> bool:
    parts = key.split(".") if isinstance(key, str) else []
    return len(parts) in (2, 3) and all(p and p.isidentifier() for p in parts)
