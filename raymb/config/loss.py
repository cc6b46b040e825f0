"""[loss] and [metrics]: what a step minimises and what validation reports besides val_loss.

A loss is a built-in (cross-entropy with class weights, label smoothing and ignore_index;
squared error; binary cross-entropy with logits for multi-label targets) or a function of
your own, `package.module:function`. Every loss is a sum over the step's rows divided by
the step's count (rows, or the counted elements a loss returns), whatever the workers and
microbatches: docs/your-model.md.
"""

from __future__ import annotations

from typing import Annotated

from annotated_types import Interval

from raymb.config.build import require, section

BUILTIN_LOSSES = ("auto", "cross_entropy", "mse", "bce")
FUNCTION = "package.module:function"


def is_function(name: str) -> bool:
    """Whether a loss or metrics name is `package.module:function` (checked when imported)."""
    return ":" in name


@section("loss")
class LossSection:
    """The loss: a built-in or your own function."""

    name: str = "auto"
    """auto (cross-entropy for integer labels and token blocks, squared error for floating
    labels), cross_entropy, mse, bce (binary cross-entropy with logits: multi-label targets,
    a fixed-length 0/1 label column), or package.module:function: a loss of your own, called
    as function(outputs, targets) and returning each row's loss, or (each row's summed loss,
    each row's count of counted elements): docs/your-model.md."""
    class_weights: list[float] | None = None
    """cross_entropy: one weight per class; the loss is divided by the summed weights of the
    step's labels, as torch's weighted mean."""
    label_smoothing: Annotated[float, Interval(ge=0, lt=1)] = 0.0
    """cross_entropy: the share of each target spread evenly over the classes."""
    ignore_index: int | None = None
    """cross_entropy: labels of this value (padding tokens, -100) are not counted."""

    def __post_init__(self) -> None:
        name = self.name
        what = ", ".join(BUILTIN_LOSSES) + f" or {FUNCTION}"
        require(name in BUILTIN_LOSSES or is_function(name), "loss.name", what, name)
        ce = ("class_weights", "label_smoothing", "ignore_index")
        on = [k for k in ce if getattr(self, k) not in (None, 0.0)]
        if on and name not in ("auto", "cross_entropy"):
            require(False, f"loss.{on[0]}", 'used with loss.name = "cross_entropy"', name)
        weights = self.class_weights
        what = "2 or more positive weights, one per class"
        ok = weights is None or (len(weights) >= 2 and all(w > 0 for w in weights))
        require(ok, "loss.class_weights", what, weights)

    @property
    def builtin_default(self) -> bool:
        """Today's loss: cross-entropy or squared error by the label, one count a row (a
        token for lm), known before the step."""
        return self.name == "auto" and not any(
            (self.class_weights, self.label_smoothing, self.ignore_index is not None)
        )


@section("metrics")
class MetricsSection:
    """Validation metrics of your own, beside val_loss and val_accuracy."""

    name: str | None = None
    """package.module:function, called as function(outputs, targets) on each validation
    batch and returning {metric: (sum, count)}; each metric is its sums over the whole
    validation set divided by its counts (exact for any number of workers) and appears as
    val_<metric> in metrics.csv, summary.json, the progress line, TensorBoard and MLflow."""

    def __post_init__(self) -> None:
        name = self.name
        require(name is None or is_function(name), "metrics.name", FUNCTION, name)
