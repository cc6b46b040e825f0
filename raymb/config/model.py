"""[model]: the model, a built-in family or a factory of your own."""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from annotated_types import Ge
from pydantic.types import PositiveInt

from raymb.config.build import Fraction, require, section

BUILTIN_MODELS = ("linear", "mlp", "cnn", "gpt")


@section("model")
class ModelSection:
    """The model: a built-in family or a factory of your own."""

    name: str = "linear"
    """linear, mlp, cnn, gpt, or package.module:factory (called as factory(in_features,
    out_features) for flat features, factory(input_shape, out_features) for tensor columns;
    out_features is the vocabulary size for data.task = "lm")."""
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layer widths of the mlp."""
    num_classes: Annotated[int, Ge(2)] | None = None
    """Classes of a classifier; unset: max label + 1."""
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    """cnn: channels of each residual stage (each stage after the first halves the image)."""
    norm: Literal["batch", "group"] = "batch"
    """cnn: BatchNorm (statistics depend on how a step is cut into microbatches: the
    equivalence contract does not hold) or GroupNorm (exact)."""
    depth: PositiveInt = 4
    """gpt: transformer blocks."""
    width: PositiveInt = 128
    """gpt: embedding width (a multiple of model.heads)."""
    heads: PositiveInt = 4
    """gpt: attention heads."""
    block_size: PositiveInt | None = None
    """gpt: longest context (positions); unset: the data's block (tokens per row - 1)."""
    dropout: Fraction = 0.0
    """gpt: dropout rate (0 keeps the equivalence contract exact)."""

    def __post_init__(self) -> None:
        name, hidden, widths = self.name, self.hidden, self.widths
        names = ", ".join(BUILTIN_MODELS) + " or package.module:factory"
        require(name in BUILTIN_MODELS or ":" in name, "model.name", names, name)
        require(all(h > 0 for h in hidden), "model.hidden", "positive layer widths", hidden)
        what = "a non-empty list of positive channel counts"
        require(bool(widths) and all(w > 0 for w in widths), "model.widths", what, widths)
        what = f"a multiple of model.heads={self.heads}"
        require(self.width % self.heads == 0, "model.width", what, self.width)
