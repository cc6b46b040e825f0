"""Model registry: linear, mlp, cnn, gpt, transformers, or a user's own `package.module:factory`.

One file per family (mlp.py: linear and mlp; cnn.py; gpt.py; hf.py: a Hugging Face
transformers model); a pretrained start and frozen parameters: init_from.py. A model is built
for one row's shape: (d,) flat features, (C, H, W) images, (T,) token blocks. The loss:
raymb.core.loss.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from raymb.code import load_callable
from raymb.config import Model
from raymb.errors import ConfigError
from raymb.models import cnn, gpt, hf, mlp

__all__ = ["build_model", "initialise", "load_factory"]

FAMILIES = {
    "linear": mlp.build,
    "mlp": mlp.build,
    "cnn": cnn.build,
    "gpt": gpt.build,
    "transformers": hf.build,
}


def build_model(
    section: Model,
    input_shape: int | Sequence[int] | dict[str, Sequence[int]],
    out_features: int,
) -> nn.Module:
    """The model of `model.name` for rows of `input_shape` (d, or a shape such as (d,),
    (C, H, W) or (T,); named inputs, data.inputs: {column: shape}) and the task's outputs (1,
    the classes, or the vocabulary size; a transformers language model's vocabulary is its
    config's).

    A custom factory is called as factory(d, out_features) for flat rows ((d,) or an int),
    factory(input_shape, out_features), a tuple, for tensor rows, and factory({column:
    shape}, out_features) for named inputs. A built-in family given named inputs reads its
    rows from input_ids (a transformers model), else from the first column.
    """
    if isinstance(input_shape, dict) and section.name not in FAMILIES:
        named = {k: tuple(map(int, v)) for k, v in input_shape.items()}
        return _checked(section, load_factory(section.name)(named, out_features))
    if isinstance(input_shape, dict):
        input_shape = input_shape.get("input_ids", next(iter(input_shape.values())))
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(map(int, input_shape))
    family = FAMILIES.get(section.name)
    if family is not None:
        model = family(section, shape, out_features)
        initialise(model, getattr(section, "init", "default"))  # transformers: its own
        return model
    factory = load_factory(section.name)
    return _checked(section, factory(shape[0] if len(shape) == 1 else shape, out_features))


def _checked(section: Model, model: object) -> nn.Module:
    """A factory's model, or a ConfigError naming model.name."""
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.name {section.name!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


INITS = {
    "xavier": nn.init.xavier_uniform_,
    "kaiming": lambda weight: nn.init.kaiming_normal_(weight, nonlinearity="relu"),
    "orthogonal": nn.init.orthogonal_,
}
"""model.init: what fills a linear or convolutional layer's weight (fan-in and fan-out as
nn.init counts them: a convolution's times its kernel's size)."""

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def initialise(model: nn.Module, how: str) -> None:
    """Re-initialise a built-in family's layers as `model.init` says: the weights of its
    linear and convolutional layers by INITS[how], their biases 0; embeddings, norms and a
    head tied to an embedding (the gpt's) keep the family's own. "default": unchanged.
    Drawn from torch's generator, seeded alike on every worker before the model is built."""
    if how == "default" or any(p.is_meta for p in model.parameters()):
        return  # a model sized on the meta device has no values to fill
    fill = INITS[how]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        if isinstance(module, LAYERS):
            if id(module.weight) not in embeddings:
                fill(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def load_factory(name: str):
    """Import `package.module:factory`, with an error naming model.name when it fails
    (raymb.code.load_callable: a factory is Python code that builds a model)."""
    return load_callable(name, "model.name", "factory")
