"""[model]: the keys of the family `model.name` chooses, and no other family's.

One section class per family (linear, mlp, cnn, gpt, transformers, a factory of your own),
each with the keys of a pretrained start (init_from, freeze: `_pretrained`), joined in `Model`,
a pydantic discriminated union on model.name. A [model] table is built as the class its name
chooses, so a key of another family is an error naming the chosen family's keys, and
--print-config shows those keys only. Configs saved before (run.json, a checkpoint's model.pt)
hold every family's keys: `saved_model` keeps the chosen family's.
"""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Any, Literal, Union

from annotated_types import Ge
from pydantic import Discriminator, Field, Tag
from pydantic.types import PositiveInt

from raymb.config.build import Fraction, OneOf, build, require, section
from raymb.errors import ConfigError

BUILTIN_MODELS = ("linear", "mlp", "cnn", "gpt")
TRANSFORMERS = "transformers"  # not a built-in: its models are transformers' (raymb.models.hf)
FACTORY = "package.module:factory"
NAMES = ", ".join((*BUILTIN_MODELS, TRANSFORMERS)) + f" or {FACTORY}"

Classes = Annotated[int, Ge(2)]
Init = Literal["default", "xavier", "kaiming", "orthogonal"]
Head = Literal["sequence_classification", "token_classification", "causal_lm", "masked_lm"]

_START = {
    "init_from": (
        "str | None",
        Field(
            default=None,
            description="Weights to start from, loaded into the built model before the first "
            "step: a raymb checkpoint (its folder or model.pt), a .safetensors file, or a "
            "Hugging Face model folder (model.safetensors or pytorch_model.bin). Every shape "
            "must fit; a key the file lacks or the model lacks is refused unless "
            "model.init_allow_missing or model.init_allow_unexpected names it.",
        ),
    ),
    "init_allow_missing": (
        "list[str]",
        Field(
            default_factory=list,
            description="fnmatch patterns of the model's keys model.init_from may lack, left "
            'as built (a new head: ["classifier.*"]).',
        ),
    ),
    "init_allow_unexpected": (
        "list[str]",
        Field(
            default_factory=list,
            description="fnmatch patterns of model.init_from's keys the model lacks, left "
            'unread (["pooler.*"]).',
        ),
    ),
    "freeze": (
        "list[str]",
        Field(
            default_factory=list,
            description="fnmatch patterns of parameter names trained no further (requires_grad "
            '= False), such as ["bert.embeddings.*"]; a pattern that matches none is refused.',
        ),
    ),
}


def _pretrained(cls: type) -> type:
    """The keys of a pretrained start, added to a family's section after its own keys (so
    that the docs and --print-config list them last); raymb.models.init_from reads them."""
    for key, (annotation, default) in _START.items():
        cls.__annotations__[key] = annotation
        setattr(cls, key, default)
    return cls


# A family other than the default must be named: the JSON Schema requires model.name there,
# so that exactly one form of [model] matches a table.
_NAMED = {"json_schema_extra": {"required": ["name"]}}


@section("model", chosen_by="name")
@_pretrained
class LinearModel:
    """linear (the default): one linear layer on the row's features (flattened)."""

    name: Literal["linear"] = "linear"
    """The model family: linear, mlp, cnn, gpt, transformers, or package.module:factory; the
    other keys of [model] are the family's own."""
    num_classes: Classes | None = None
    """Classes of a classifier; unset: max label + 1."""
    init: Init = "default"
    """The initialisation of the linear and convolutional layers' weights: default (the
    family's own), xavier (Glorot uniform), kaiming (He normal: fan-in, the ReLU gain) or
    orthogonal, then biases 0 (embeddings and norms keep the family's own)."""


@section("model", chosen_by="name", **_NAMED)
@_pretrained
class MlpModel:
    """mlp: dense layers with ReLU between them on the row's features (flattened)."""

    name: Literal["mlp"] = "mlp"
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layer widths."""
    dropout: Fraction = 0.0
    """Dropout rate after each hidden ReLU; each row's mask is drawn from (train.seed, the
    layer, the epoch, the row), so W workers x k microbatches still equal one process."""
    num_classes: Classes | None = None
    """Classes of a classifier; unset: max label + 1."""
    init: Init = "default"
    """The initialisation of the linear and convolutional layers' weights: default (the
    family's own), xavier (Glorot uniform), kaiming (He normal: fan-in, the ReLU gain) or
    orthogonal, then biases 0 (embeddings and norms keep the family's own)."""

    def __post_init__(self) -> None:
        hidden = self.hidden
        require(all(h > 0 for h in hidden), "model.hidden", "positive layer widths", hidden)


@section("model", chosen_by="name", **_NAMED)
@_pretrained
class CnnModel:
    """cnn: a small ResNet for image rows [C, H, W]."""

    name: Literal["cnn"] = "cnn"
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    """Channels of each residual stage (each stage after the first halves the image)."""
    norm: Literal["batch", "group"] = "batch"
    """BatchNorm (statistics depend on how a step is cut into microbatches: the equivalence
    contract does not hold) or GroupNorm (exact)."""
    dropout: Fraction = 0.0
    """Dropout rate after each residual stage; each row's mask is drawn from (train.seed, the
    stage, the epoch, the row), so W workers x k microbatches still equal one process."""
    num_classes: Classes | None = None
    """Classes of a classifier; unset: max label + 1."""
    init: Init = "default"
    """The initialisation of the linear and convolutional layers' weights: default (the
    family's own), xavier (Glorot uniform), kaiming (He normal: fan-in, the ReLU gain) or
    orthogonal, then biases 0 (embeddings and norms keep the family's own)."""

    def __post_init__(self) -> None:
        widths, what = self.widths, "a non-empty list of positive channel counts"
        require(bool(widths) and all(w > 0 for w in widths), "model.widths", what, widths)


@section("model", chosen_by="name", **_NAMED)
@_pretrained
class GptModel:
    """gpt: a decoder-only transformer over token blocks (data.task = "lm")."""

    name: Literal["gpt"] = "gpt"
    depth: PositiveInt = 4
    """Transformer blocks."""
    width: PositiveInt = 128
    """Embedding width (a multiple of model.heads)."""
    heads: PositiveInt = 4
    """Attention heads."""
    block_size: PositiveInt | None = None
    """Longest context (positions); unset: the data's block (tokens per row - 1)."""
    dropout: Fraction = 0.0
    """Dropout rate of the embeddings, the attention weights and both residual branches; each
    row's mask is drawn from (train.seed, the layer, the epoch, the row), so W workers x k
    microbatches still equal one process."""
    num_classes: Classes | None = None
    """The vocabulary (the output width); unset: the prepared folder's vocab_size, else the
    largest token id + 1."""
    init: Init = "default"
    """The initialisation of the linear and convolutional layers' weights: default (the
    family's own), xavier (Glorot uniform), kaiming (He normal: fan-in, the ReLU gain) or
    orthogonal, then biases 0 (embeddings and norms keep the family's own)."""

    def __post_init__(self) -> None:
        what = f"a multiple of model.heads={self.heads}"
        require(self.width % self.heads == 0, "model.width", what, self.width)


@section("model", chosen_by="name", **_NAMED)
@_pretrained
class TransformersModel:
    """transformers: a Hugging Face transformers model with a head, built from its config
    alone (nothing is downloaded): it reads its own inputs (input_ids, attention_mask) and its
    logits are the outputs the loss reads. transformers' dropout draws from torch's generator,
    not from the row: for W workers x k microbatches to equal one process, set its dropout
    probabilities to 0 in model.overrides."""

    name: Literal["transformers"] = "transformers"
    config: str | None = None
    """A Hugging Face model folder holding config.json, or a config.json file; unset:
    model.overrides is the whole config, with its model_type."""
    head: Head
    """The head on the model, built with transformers' AutoModelFor<Head>.from_config:
    sequence_classification, token_classification, causal_lm or masked_lm."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Config attributes set over model.config's (num_hidden_layers = 2, hidden_size = 32); an
    attribute the config does not have is refused."""
    num_classes: Classes | None = None
    """Labels of a classification head (its num_labels); unset: max label + 1. A language
    model head's vocabulary is the config's vocab_size."""

    def __post_init__(self) -> None:
        what = "set, or model.overrides.model_type (a transformers model type such as 'bert')"
        ok = self.config is not None or isinstance(self.overrides.get("model_type"), str)
        require(ok, "model.config", what, self.config)


@section("model", chosen_by="name")
@_pretrained
class FactoryModel:
    """package.module:factory: a model of your own, called as factory(in_features,
    out_features) for flat features and factory(input_shape, out_features) for tensor
    columns (out_features: the classes, 1 for regression, the vocabulary for data.task =
    "lm")."""

    name: Annotated[str, Field(json_schema_extra={"pattern": ":"})]
    """The factory, as package.module:callable (imported before Ray starts)."""
    num_classes: Classes | None = None
    """Classes of a classifier; unset: max label + 1."""

    def __post_init__(self) -> None:
        require(":" in self.name, "model.name", NAMES, self.name)


FAMILIES: dict[str, type] = {
    "linear": LinearModel,
    "mlp": MlpModel,
    "cnn": CnnModel,
    "gpt": GptModel,
    TRANSFORMERS: TransformersModel,
    "factory": FactoryModel,
}


def _tag(value: Any) -> str | None:
    """The family of a [model] table or section: linear, mlp, cnn, gpt, transformers or
    factory."""
    name = value.get("name", "linear") if isinstance(value, dict) else getattr(value, "name", None)
    if name in BUILTIN_MODELS or name == TRANSFORMERS:
        return name
    return "factory" if isinstance(name, str) and ":" in name else None


def family(table: dict[str, Any]) -> type:
    """The section class a [model] table is built as, by its name (linear when unset)."""
    tag = _tag(table)
    if tag is None:
        raise ConfigError(f"model.name must be {NAMES} (got {table.get('name')!r})")
    return FAMILIES[tag]


Model = Annotated[
    Union[tuple(Annotated[cls, Tag(tag)] for tag, cls in FAMILIES.items())],  # noqa: UP007
    Discriminator(_tag),
    OneOf(family),
]
"""The [model] section: one of the families, chosen by model.name."""


def ModelSection(**keys: Any) -> Any:  # named as the one class [model] was before
    """The [model] section of these keys, as a [model] table reads: ModelSection(name="mlp",
    hidden=[8]) is an MlpModel; a key the family does not take is a ConfigError."""
    return build(family(keys), keys, "model")


def saved_model(table: dict[str, Any]) -> dict[str, Any]:
    """A [model] table saved before [model] held one family's keys, less the other families'
    keys (which the model never read)."""
    keys = family(table).__pydantic_fields__
    return {k: v for k, v in table.items() if k in keys}
