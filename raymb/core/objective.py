"""What a step minimises and what validation measures: the built-in losses, a loss of your own,
and your metrics, behind one object the step, the workers and `raymb eval` share.

The rule (docs/your-model.md): a step's loss is sum(loss) / sum(count) over every row of the
step on every worker. The built-in default (cross-entropy or squared error, one count a row,
a token for lm) knows its count before the step: raymb.core.step divides each microbatch's
loss by it. A counted loss (your own, cross-entropy with class weights or ignore_index, bce)
returns its count with its loss: the step sums the gradients of the summed losses and divides
them once by the step's count, all-reduced after the last microbatch. Either way W workers x k
microbatches give one process's numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from raymb.code import load_callable
from raymb.config import Config
from raymb.config.loss import is_function
from raymb.core import batch
from raymb.core.batch import Columns
from raymb.core.loss import correct, summed_loss
from raymb.errors import ConfigError

LossFn = Callable[[Any, Columns], Any]
MetricsFn = Callable[[Any, Columns], dict[str, Any]]


class LossError(ConfigError):
    """A loss or metrics function that returned what the rule cannot use (its shape, a
    negative count): one line naming loss.name or metrics.name and what to return."""


class Objective:
    """The loss of a batch as (summed loss, count), validation's sums, and the metrics."""

    def __init__(
        self,
        *,
        classify: bool,
        label: str | None = None,
        loss: LossFn | None = None,
        loss_name: str = "auto",
        class_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        ignore_index: int | None = None,
        bce: bool = False,
        metrics: MetricsFn | None = None,
        metric_names: tuple[str, ...] = (),
        metrics_name: str = "metrics.name",
    ) -> None:
        """`label`: the target column among named targets (None: the targets are the label
        tensor). `loss`: your own; else cross-entropy (`classify`, with `class_weights`,
        `label_smoothing`, `ignore_index`), bce or squared error. `metric_names`: what
        `metrics` returns, in the order validation sums them."""
        self.classify, self.label = classify and not bce, label
        self.loss, self.loss_name = loss, loss_name
        self.weights = class_weights
        self.smoothing, self.ignore = label_smoothing, ignore_index
        self.bce = bce
        self.metrics, self.metric_names, self.metrics_name = metrics, metric_names, metrics_name
        self.step_count: torch.Tensor | None = None
        """A counted objective's count of the last step on this worker (raymb.core.step)."""
        self.counted = (
            loss is not None or bce or class_weights is not None or ignore_index is not None
        )
        """Whether the count comes with the loss (the step divides once, after the last
        microbatch), rather than being the rows (tokens for lm) known before."""

    @classmethod
    def of(
        cls,
        config: Config,
        classify: bool,
        *,
        loss: LossFn | None = None,
        metrics: MetricsFn | None = None,
        metric_names: tuple[str, ...] = (),
    ) -> Objective:
        """A run's objective: [loss] and [metrics] of its config, or the callables given from
        Python (raymb.train(loss=..., metrics=...)), which take their place."""
        section, named = config.loss, config.data.named
        if loss is None and is_function(section.name):
            loss = load_callable(section.name, "loss.name")
        if metrics is None and config.metrics.name is not None:
            metrics = load_callable(config.metrics.name, "metrics.name")
        return cls(
            classify=classify,
            label=None if named is None else named.label,
            loss=loss,
            loss_name=section.name
            if is_function(section.name)
            else getattr(loss, "__name__", "loss"),
            class_weights=section.class_weights,
            label_smoothing=section.label_smoothing,
            ignore_index=section.ignore_index,
            bce=section.name == "bce",
            metrics=metrics,
            metric_names=metric_names,
            metrics_name="metrics.name",
        )

    def target(self, targets: Columns) -> torch.Tensor:
        """The built-in losses' target: the label tensor, or the label column of the named."""
        return targets[self.label] if isinstance(targets, dict) else targets

    def __call__(self, output: Any, targets: Columns) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the batch's summed loss, its count; None when not counted: the rows, or tokens)."""
        if self.loss is not None:
            return self._own(output, targets)
        out, y = batch.logits(output), self.target(targets)
        if self.bce:
            y = y.to(out.dtype).reshape(out.shape)
            total = nn.functional.binary_cross_entropy_with_logits(out, y, reduction="sum")
            return total, torch.tensor(float(y.numel()), device=out.device)
        if not self.counted:
            if self.smoothing and self.classify:
                return self._cross_entropy(out, y)[0], None
            return summed_loss(out, y, self.classify), None
        return self._cross_entropy(out, y)

    def _cross_entropy(
        self, out: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy with class weights and ignore_index: each element's loss as torch's
        reduction "none" gives it, counted by its label's weight (1 without weights), 0
        where the label is ignored: torch's weighted mean is sum / count."""
        if out.dim() > 2:
            out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
        weight = None
        if self.weights is not None:
            weight = torch.tensor(self.weights, dtype=out.dtype, device=out.device)
        ignore = -100 if self.ignore is None else self.ignore
        each = nn.functional.cross_entropy(
            out,
            y,
            weight=weight,
            ignore_index=ignore,
            label_smoothing=self.smoothing,
            reduction="none",
        )
        kept = y != ignore
        if weight is None:
            count = kept.sum().to(out.dtype)
        else:
            count = (weight[y.clamp(0, len(weight) - 1)] * kept).sum()
        return each.sum(), count

    def _own(self, output: Any, targets: Columns) -> tuple[torch.Tensor, torch.Tensor]:
        """Your loss: each row's loss (count 1 a row), or (each row's sum, each row's count)."""
        rows = batch.rows(targets)
        got = self.loss(output, targets)
        if isinstance(got, (tuple, list)) and len(got) == 2:
            sums, counts = got
            sums = _per_row(sums, rows, self.loss_name, "summed loss")
            counts = _per_row(counts, rows, self.loss_name, "count")
            low = counts.detach().min() if rows else None
            if low is not None and bool(low < 0):
                raise LossError(
                    f"loss.name {self.loss_name!r} returned a negative count ({low.item():g}): "
                    "count each row's counted elements (0 or more)"
                )
            return sums.sum(), counts.detach().sum().to(sums.dtype)
        sums = _per_row(got, rows, self.loss_name, "loss")
        return sums.sum(), torch.tensor(float(rows), dtype=sums.dtype, device=sums.device)

    @torch.no_grad()
    def sums(self, model: nn.Module, inputs: Columns, targets: Columns) -> torch.Tensor:
        """Validation's sums of one batch, float64 on the batch's device: [summed loss,
        count, correct predictions, predictions counted, then each metric's sum and count]."""
        output = batch.forward(model, inputs)
        device = batch.device_of(targets)
        loss, count = self(output, targets)
        if count is None:  # the rows, or the tokens of lm
            count = torch.tensor(float(self.target(targets).numel()), device=device)
        values = [loss.double(), count.double(), *self._accuracy(output, targets, device)]
        if self.metrics is not None:
            values += self._metric_values(output, targets, device)
        return torch.stack([v.to(device) for v in values])

    def _accuracy(self, output: Any, targets: Columns, device) -> list[torch.Tensor]:
        """(correct argmax predictions, predictions counted): classifiers on class labels,
        ignore_index's labels not counted; (0, 0) otherwise."""
        zero = torch.zeros((), dtype=torch.float64, device=device)
        if not self.classify or self.bce:
            return [zero, zero]
        try:
            out, y = batch.logits(output), self.target(targets)
        except (TypeError, KeyError):
            return [zero, zero]
        if out.shape[:-1] != y.shape or y.is_floating_point():
            return [zero, zero]
        if self.ignore is None:
            return [correct(out, y).double(), torch.tensor(float(y.numel()), device=device)]
        kept = y != self.ignore
        hits = ((out.argmax(dim=-1) == y) & kept).sum()
        return [hits.double(), kept.sum().double()]

    def _metric_values(self, output: Any, targets: Columns, device) -> list[torch.Tensor]:
        got = self.metrics(output, targets)
        where = f"{self.metrics_name} {getattr(self.metrics, '__name__', '')!r}".rstrip(" '")
        if not isinstance(got, dict):
            raise LossError(
                f"{where} returned {type(got).__name__}: return a dict of metric: (sum, count)"
            )
        values = []
        for name in self.metric_names:
            pair = got.get(name)
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise LossError(
                    f"{where} returned no (sum, count) for {name!r}: return one for every metric "
                    "at every batch"
                )
            values += [torch.as_tensor(v, device=device).double().sum() for v in pair]
        return values


def metric_names(metrics: MetricsFn, output: Any, targets: Columns, key: str) -> tuple[str, ...]:
    """The metrics a function returns for one batch, sorted (the driver's dry run names them
    for the workers, which all sum the same vector)."""
    got = metrics(output, targets)
    if not isinstance(got, dict) or not got:
        raise LossError(f"{key} returned {got!r}: return a dict of metric: (sum, count)")
    for name in got:
        if not (isinstance(name, str) and name.isidentifier()):
            raise LossError(f"{key} returned metric name {name!r}: use identifiers (f1, recall)")
    return tuple(sorted(got))


def _per_row(value: Any, rows: int, name: str, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.shape != (rows,):
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise LossError(
            f"loss.name {name!r} returned a {what} of shape {shape} for {rows} rows: return one "
            f"per row, shape [{rows}] (reduction='none', summed over each row's elements)"
        )
    return value
