"""A sweep's config (`raymb tune`): an ordinary config plus [tune] and [tune.space].

Pure Python, no Ray and no torch: `load_sweep` reads the file and the --set overrides, checks
[tune] and the space, and checks every trial's config through `Config.from_dict` (every grid
point; the bounds and a few seeded draws of a random space), so that a sweep that would fail
in its third trial is refused before anything starts. `trials` expands a grid into the trials'
values, in the order Ray Tune runs them.

`raymb train` refuses a config that has [tune] (raymb.load): it names `raymb tune`.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from annotated_types import Ge
from pydantic.types import NonNegativeInt, PositiveInt

from raymb.config.build import MAX_SEED, section
from raymb.config.config import Config
from raymb.config.sections import metric_order
from raymb.config.tune_space import Dimension, parse_dimension
from raymb.errors import ConfigError

RANDOM_CHECKS = 8
"""Seeded draws of a random space checked before the sweep starts (besides its bounds)."""
MAX_TRIALS = 10_000
"""The default of tune.max_trials: the most training runs (trials x folds) a sweep may have."""
MAX_CV_FOLDS = 1_000
"""The most folds of tune.cv_folds (each fold is a run of its own, one after another)."""


@section("tune")
class TuneSection:
    """`raymb tune`: a sweep over the keys of [tune.space], each trial an ordinary run in
    <run dir>/trials/<trial>/ (`raymb train` refuses a config with [tune])."""

    metric: str | None = None
    """The metric trials are compared by: val_loss, train_loss, val_accuracy or val_<name> of
    a metric of your own (metrics.name's; needs tune.mode, or checkpoint.mode when it is
    checkpoint.metric too); unset: checkpoint.metric."""
    mode: Literal["min", "max"] | None = None
    """Whether the best trial has the least or the most of the metric; unset: checkpoint.mode
    when the metric is checkpoint.metric, else max for val_accuracy, min for the losses."""
    search: Literal["grid", "random", "optuna"] = "grid"
    """grid: every combination of the lists in [tune.space]; random: `samples` seeded draws;
    optuna: `samples` trials chosen by Optuna's TPE sampler (pip install 'raymb[tune]')."""
    samples: PositiveInt = 1
    """grid: repeats of the whole grid, each with its own train.seed (the first keeps
    train.seed, the others are drawn from it); random, optuna: the number of trials."""
    scheduler: Literal["fifo", "asha"] = "fifo"
    """fifo: every trial runs to its end; asha: ASHA stops trials whose metric lags at a rung
    (after grace_epochs, then every reduction_factor times as many epochs)."""
    grace_epochs: PositiveInt = 1
    """asha: epochs a trial runs before it may be stopped."""
    reduction_factor: Annotated[int, Ge(2)] = 3
    """asha: the share of trials kept at each rung is 1 / reduction_factor."""
    max_concurrent: NonNegativeInt = 0
    """Trials at once; 0: as many as the cluster has CPUs for (scale.workers x each worker's
    CPUs, one CPU left for Ray Data's reads)."""
    cv_folds: NonNegativeInt = 0
    """k >= 2: k-fold cross-validation over data.train: each trial trains k runs, fold f
    validating on the rows whose position in a permutation of the training rows drawn from
    train.seed is f mod k (data.fold, data.folds), and its metric is the mean over the
    folds; data.val is not used. 0: none. At most 1000, and at most data.train's rows (each
    fold validates on at least one row)."""
    max_trials: PositiveInt = MAX_TRIALS
    """The most training runs the sweep may have, counted before anything is built: a
    grid's points x samples, or samples for random and optuna, times cv_folds (a fold is a
    run). A larger sweep is refused; raise this to run it."""
    space: dict[str, Any] = field(default_factory=dict)
    """[tune.space]: a config key as written ("optim.lr") = a list of values (the grid's;
    the choices under random or optuna), or one distribution: { uniform = [low, high] },
    { loguniform = [low, high] } (low > 0), { randint = [low, high] } (high excluded),
    { choice = [a, b, ...] }."""


@dataclass(frozen=True)
class Sweep:
    """A checked sweep: the base config (its tables `raw`, without [tune]), [tune], the space,
    and the metric resolved."""

    raw: dict[str, Any]
    config: Config
    tune: TuneSection
    space: tuple[Dimension, ...]
    metric: str
    mode: str

    @property
    def keys(self) -> list[str]:
        """The searched keys as written, and train.seed for a grid repeated with new seeds."""
        keys = [d.key for d in self.space]
        if self.repeats_seed:
            keys.append("train.seed")
        return keys

    @property
    def repeats_seed(self) -> bool:
        return (
            self.tune.search == "grid"
            and self.tune.samples > 1
            and "train.seed" not in [d.key for d in self.space]
        )

    def trial_count(self) -> int:
        """The sweep's trials, counted without building them: a grid's points x samples, or
        samples for random and optuna."""
        if self.tune.search != "grid":
            return self.tune.samples
        return math.prod(len(d.values) for d in self.space) * self.tune.samples

    def grid(self) -> list[dict[str, Any]]:
        """Every trial's values of a grid search: the product of the lists, `samples` times
        (each repeat with its own train.seed)."""
        points = [
            dict(zip([d.key for d in self.space], combo))
            for combo in itertools.product(*(d.values for d in self.space))
        ]
        if not self.repeats_seed:
            return points
        seeds = repeat_seeds(self.config.train.seed, self.tune.samples)
        return [{**p, "train.seed": s} for s in seeds for p in points]

    def trial_raw(self, values: dict[str, Any], *, storage: str, name: str) -> dict[str, Any]:
        """A trial's config tables: the base with the trial's values, its run directory
        `storage`/`name`."""
        raw = _deep_copy(self.raw)
        for key, value in values.items():
            set_key(raw, key, value)
        if self.tune.scheduler == "asha" and "min_interval_s" not in raw.get("checkpoint", {}):
            # ASHA compares trials at each validation: validate at every epoch's end.
            set_key(raw, "checkpoint.min_interval_s", 0.0)
        set_key(raw, "run.storage_path", storage)
        set_key(raw, "run.name", name)
        return raw

    def fold_raw(self, raw: dict[str, Any], fold: int, *, storage: str) -> dict[str, Any]:
        """Fold `fold` of a trial's config under cross-validation: the held-out rows of
        data.train validate, data.val is not read."""
        raw = _deep_copy(raw)
        set_key(raw, "data.folds", self.tune.cv_folds)
        set_key(raw, "data.fold", fold)
        set_key(raw, "data.val", "")
        set_key(raw, "run.storage_path", storage)
        set_key(raw, "run.name", f"fold-{fold}")
        if "metric" not in raw.get("checkpoint", {}):
            set_key(raw, "checkpoint.metric", self.config.checkpoint.metric)
        return raw

    def best_raw(self, values: dict[str, Any]) -> dict[str, Any]:
        """best.toml's tables: the base with the best trial's values, run.name <name>-best."""
        raw = _deep_copy(self.raw)
        for key, value in values.items():
            set_key(raw, key, value)
        if self.tune.scheduler == "asha" and "min_interval_s" not in raw.get("checkpoint", {}):
            set_key(raw, "checkpoint.min_interval_s", 0.0)  # as the trial validated
        set_key(raw, "run.name", f"{self.config.run.name}-best")
        return raw


def check_sweep(raw: dict[str, Any], config: Config, tune: TuneSection) -> Sweep:
    """The checks of [tune] against the base config, and of every trial's config."""
    storage_path = config.run.storage_path
    if "://" in storage_path:  # from the scheme alone: no store is contacted
        raise ConfigError(
            f"run.storage_path={storage_path!r}: raymb tune keeps its sweeps on a local (or "
            "mounted) path, not in an object store: set run.storage_path to a local folder"
        )
    if tune.cv_folds == 1:
        raise ConfigError("tune.cv_folds must be 0 (none) or at least 2 (got 1)")
    if tune.cv_folds > MAX_CV_FOLDS:
        raise ConfigError(
            f"tune.cv_folds must be at most {MAX_CV_FOLDS} (got {tune.cv_folds}): each fold "
            "is a training run of its own"
        )
    if tune.scheduler == "asha" and tune.grace_epochs > config.train.epochs:
        raise ConfigError(
            f"tune.grace_epochs={tune.grace_epochs} is more than train.epochs="
            f"{config.train.epochs}: ASHA could never stop a trial; lower tune.grace_epochs "
            'or use scheduler = "fifo"'
        )
    if tune.search == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise ConfigError(
                'tune.search = "optuna" needs optuna: pip install "raymb[tune]"'
                ' (or use search = "random")'
            )
    if tune.scheduler == "asha" and tune.cv_folds:
        raise ConfigError(
            'tune.scheduler = "asha" cannot stop cross-validated trials (their folds run one '
            'after another): use scheduler = "fifo" or cv_folds = 0'
        )
    if tune.search == "grid" and tune.samples > 1 and "train.seed" in tune.space:
        raise ConfigError(
            "tune.samples > 1 repeats a grid with new train.seed values: do not search "
            '"train.seed" as well'
        )
    metric = tune.metric or config.checkpoint.metric
    mode = tune.mode
    if mode is None and metric == config.checkpoint.metric:
        mode = config.checkpoint.order  # checkpoint.mode says which way it is better
    mode = metric_order(metric, mode, "tune")
    if metric.startswith("val_") and config.data.val is None and not tune.cv_folds:
        raise ConfigError(
            f"tune.metric={metric!r} needs data.val (or tune.cv_folds >= 2); "
            'or set tune.metric = "train_loss"'
        )
    if tune.cv_folds and config.data.cache is False:
        raise ConfigError(
            'tune.cv_folds needs data.cache = true or "auto" (a fold is an index into the '
            "cached rows)"
        )
    if tune.cv_folds and config.data.shuffle == "files":
        raise ConfigError(
            'tune.cv_folds needs data.shuffle = "rows" or "none" (a fold is a set of rows, '
            "not of files)"
        )
    space = tuple(parse_dimension(k, v, tune.search) for k, v in tune.space.items())
    if not space:
        raise ConfigError('[tune.space] is empty: give at least one key, e.g. "optim.lr" = [...]')
    sweep = Sweep(raw=raw, config=config, tune=tune, space=space, metric=metric, mode=mode)
    _check_count(sweep)  # before any point or seed is built
    if tune.search == "grid":
        candidates = sweep.grid()
    else:  # every listed value and range end with the others' first, then seeded draws
        first = {d.key: d.edges()[0] for d in space}
        candidates = [{**first, d.key: v} for d in space for v in d.edges()]
        rng = random.Random(config.train.seed)
        candidates += [{d.key: d.draw(rng) for d in space} for _ in range(RANDOM_CHECKS)]
    for values in candidates:
        _check_trial(sweep, values)
    return sweep


def _check_count(sweep: Sweep) -> None:
    """The sweep's training runs, counted without building them, against tune.max_trials."""
    tune = sweep.tune
    folds = max(tune.cv_folds, 1)
    runs = sweep.trial_count() * folds
    if runs <= tune.max_trials:
        return
    if tune.search == "grid":
        points = sweep.trial_count() // tune.samples
        sizes = " x ".join(str(len(d.values)) for d in sweep.space)
        how = f"{points:,} grid point{'s' * (points != 1)} ({sizes}) x samples={tune.samples}"
    else:
        how = f"samples={tune.samples}"
    if folds > 1:
        how += f" x cv_folds={folds}"
    raise ConfigError(
        f"this sweep would train {runs:,} runs ({how}), more than tune.max_trials="
        f"{tune.max_trials:,}: shrink [tune.space] or samples, or raise tune.max_trials"
    )


def _check_trial(sweep: Sweep, values: dict[str, Any]) -> None:
    """A trial's config must build; a key that is no config key is named as such."""
    raw = sweep.trial_raw(values, storage=sweep.config.run.storage_path, name="trial")
    try:
        config = Config.from_dict(raw)
        if sweep.tune.cv_folds:
            Config.from_dict(sweep.fold_raw(raw, 0, storage=config.run.storage_path))
    except ConfigError as e:
        text = str(e)
        for key in values:
            if key in text and ("unknown config" in text or "is not a key of" in text):
                raise ConfigError(f'tune.space."{key}" is not a config key: {text}') from None
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise ConfigError(f"tune.space: the trial {shown} is not a valid config: {text}") from None


def repeat_seeds(seed: int, samples: int) -> list[int]:
    """train.seed of each repeat of a grid: the first keeps `seed`, the others are drawn
    from it (distinct, within 0..MAX_SEED)."""
    seeds = [seed]
    seen = {seed}  # a set: the draw stays linear in `samples`
    r = 0
    while len(seeds) < samples:
        r += 1
        digest = hashlib.sha256(f"raymb-tune:{seed}:{r}".encode()).digest()
        drawn = int.from_bytes(digest[:8], "big") % (MAX_SEED + 1)
        if drawn not in seen:
            seen.add(drawn)
            seeds.append(drawn)
    return seeds


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted config key ("optim.lr", "train.early_stopping.patience") in `raw`."""
    *tables, last = key.split(".")
    table = raw
    for part in tables:
        inner = table.get(part)
        if not isinstance(inner, dict):
            inner = table[part] = {}
        table = inner
    table[last] = value


def _deep_copy(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


def sweep_toml(sweep: Sweep) -> str:
    """--print-config: the resolved base config, then [tune] and [tune.space] as read."""
    from raymb.config.toml import to_toml, toml_value

    lines = [to_toml(sweep.config).rstrip("\n"), "", "[tune]"]
    tune = sweep.tune
    for name in TuneSection.__pydantic_fields__:
        value = getattr(tune, name)
        if name == "space":
            continue
        if name == "metric":
            value = sweep.metric
        if name == "mode":
            value = sweep.mode
        lines.append(f"{name} = {toml_value(value)}")
    lines += ["", "[tune.space]"]
    for key, value in tune.space.items():
        lines.append(f'"{key}" = {toml_value(value)}')
    return "\n".join(lines) + "\n"
