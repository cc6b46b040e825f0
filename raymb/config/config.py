"""Config: the whole run configuration, one section per TOML table, and what follows from
several of them together (the batch arithmetic: G rows a step, near-equal shares of W
workers, each cut into microbatches of m, the last short).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any

from raymb.config.build import build, require, section
from raymb.config.data import DataSection
from raymb.config.loss import LossSection, MetricsSection
from raymb.config.model import LinearModel, Model, saved_model
from raymb.config.sections import (
    CheckpointSection,
    FaultSection,
    LogSection,
    OptimSection,
    OuterSection,
    RunSection,
    ScaleSection,
    StorageSection,
    TrainSection,
)
from raymb.errors import ConfigError


@section("", title="raymb config")
class Config:
    """A raymb run: one table per section; every key is optional."""

    run: RunSection = field(default_factory=RunSection)
    storage: StorageSection = field(default_factory=StorageSection)
    data: DataSection = field(default_factory=DataSection)
    model: Model = field(default_factory=LinearModel)
    """The model: model.name chooses the family, and [model] takes that family's keys."""
    loss: LossSection = field(default_factory=LossSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    scale: ScaleSection = field(default_factory=ScaleSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    outer: OuterSection = field(default_factory=OuterSection)
    fault: FaultSection = field(default_factory=FaultSection)

    def __post_init__(self) -> None:
        G, m, W = self.train.global_batch_size, self.train.microbatch_size, self.scale.max_workers
        low = self.scale.min_workers
        require(self.fault.rank < low, "fault.rank", f"< scale.workers={low}", self.fault.rank)
        if self.optim.name == "lbfgs":
            self._check_lbfgs()
        if self.train.noise_scale:
            why = "with train.noise_scale = true (it measures the gradient all-reduce)"
            require(self.train.sync == "grad", "train.sync", f'"grad" {why}', self.train.sync)
            what = "a first-order optimizer with train.noise_scale = true (L-BFGS: full batch)"
            require(self.optim.name != "lbfgs", "optim.name", what, self.optim.name)
        if self.train.ema_decay is not None:
            # Between averagings param and diloco workers hold different weights: no one
            # worker's average is the run's, and an average of the averaged weights alone
            # would move every train.average_every steps, another decay.
            why = "with train.ema_decay (every worker holds the same weights after a step)"
            require(self.train.sync == "grad", "train.sync", f'"grad" {why}', self.train.sync)
        if not self.loss.builtin_default:
            why = "with a counted loss (a step's count is known after its forward)"
            require(
                self.optim.name != "lbfgs", "optim.name", f"a first-order optimizer {why}", "lbfgs"
            )
        if self.data.task == "lm" and self.loss.name not in ("auto", "cross_entropy"):
            lm = '"auto" or "cross_entropy" with data.task = "lm" (the next token)'
            require(False, "loss.name", lm, self.loss.name)
        if G == "all" or self.scale.elastic:
            return  # elastic: a W that does not divide G splits steps unevenly (raymb.core.plan)
        # Any split is exact (each row's loss is divided by the step's rows, all-reduced when
        # the workers' differ): W need not divide G, nor m a worker's share of it.
        if G < W:
            raise ConfigError(
                f"train.global_batch_size={G} is smaller than scale.workers={W}: every worker "
                "needs a row of every step"
            )
        share = math.ceil(G / W)
        if isinstance(m, int) and m > share:
            raise ConfigError(
                f"train.microbatch_size={m} is larger than a worker's share of a step "
                f"(train.global_batch_size={G} / scale.workers={W}, rounded up: {share}): "
                f"lower train.microbatch_size to at most {share}"
            )

    def _check_lbfgs(self) -> None:
        """L-BFGS takes full-batch steps that every worker takes alike: each of its loss and
        gradient evaluations is all-reduced over the whole data set."""
        train, why = self.train, 'with optim.name = "lbfgs"'
        G, sync, on_nan = train.global_batch_size, train.sync, train.on_nan
        require(G == "all", "train.global_batch_size", f'"all" {why} (full batch only)', G)
        require(sync == "grad", "train.sync", f'"grad" {why} (one line search for all)', sync)
        require(on_nan == "abort", "train.on_nan", f'"abort" {why}', on_nan)

    def microbatch(self) -> int | None:
        """m, resolved: G / W when unset (G / max W, rounded up, for elastic workers); None
        where it depends on the data or the memory (full batch without m, "auto")."""
        G, m = self.train.global_batch_size, self.train.microbatch_size
        if m == "auto":
            return None
        if m is not None:
            return m
        return None if G == "all" else -(-G // self.scale.max_workers)

    def accumulation_steps(self) -> int | None:
        """k: the microbatches of a worker's share of a step, ceil(ceil(G / W) / m) (the last
        may be short; a worker with a row fewer may take one fewer); None for full batch, an
        automatic m or elastic workers, where it depends on the data or the cluster."""
        G, m = self.train.global_batch_size, self.microbatch()
        if G == "all" or m is None or self.scale.elastic:
            return None
        return math.ceil(math.ceil(G / self.scale.max_workers) / m)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """Build and check a Config from nested dicts (TOML tables), as given: nothing is read
        (raymb.load.load_config merges a prepared folder's manifest first)."""
        data = raw.get("data")
        if isinstance(data, dict) and "train" in data and "val" not in data:
            # Never validate a user's model on the demo set.
            raw = {**raw, "data": {**data, "val": None}}
        config = build(cls, raw, "")
        no_val = config.data.val is None and not config.data.folds
        if no_val and "metric" not in raw.get("checkpoint", {}):
            # The default, val_loss, would refuse to train: fall back to what there is.
            checkpoint = dataclasses.replace(config.checkpoint, metric="train_loss")
            config = dataclasses.replace(config, checkpoint=checkpoint)
        return config

    @classmethod
    def from_saved(cls, raw: dict[str, Any]) -> Config:
        """The Config a run saved (run.json, a checkpoint's model.pt): from_dict, less the
        other model families' keys that configs saved before [model] held one family's keep."""
        model = raw.get("model")
        if isinstance(model, dict):
            raw = {**raw, "model": saved_model(model)}
        return cls.from_dict(raw)
