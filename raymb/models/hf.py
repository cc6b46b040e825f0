"""model.name = "transformers": a Hugging Face transformers model with a head, from its config.

Nothing is downloaded: the config is a local folder's config.json (or that file), read as any
input is (stat-checked, bounded), with model.overrides over it; or model.overrides alone,
naming its model_type. The model is transformers' own: it takes input_ids (and
attention_mask) by name and returns a ModelOutput whose .logits the loss reads. transformers
is imported here, when the family is built, so that `import raymb` stays fast.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from torch import nn

from raymb.config.model import TransformersModel
from raymb.errors import ConfigError
from raymb.files import JSON_LIMIT, InputError, check_input, read_bounded

HEADS = {
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
}
CLASSIFIERS = ("sequence_classification", "token_classification")
CONFIG_FILE = "config.json"


def build(section: TransformersModel, shape: tuple[int, ...], out_features: int) -> nn.Module:
    """The model of `section.head` for rows of (T,) token ids: out_features is a classifier's
    num_labels; a language model head's vocabulary is its config's, which must hold the
    data's out_features ids."""
    transformers = _import()
    config = hf_config(section, out_features)
    _check_fits(section, config, shape, out_features)
    return getattr(transformers, HEADS[section.head]).from_config(config)


def build_saved(section: TransformersModel, keys: dict[str, Any]) -> nn.Module:
    """The model of `section.head` from the resolved config a checkpoint stores (its
    config.to_dict()): the tools rebuild it without the folder model.config named."""
    transformers = _import()
    keys = dict(keys)
    config = transformers.AutoConfig.for_model(keys.pop("model_type"), **keys)
    return getattr(transformers, HEADS[section.head]).from_config(config)


def hf_config(section: TransformersModel, out_features: int) -> Any:
    """The transformers config: config.json's keys, model.overrides over them, and a
    classifier's num_labels; ConfigError for an attribute the config does not have."""
    transformers = _import()
    keys = _read_config(section.config) if section.config is not None else {}
    keys = {**keys, **section.overrides}
    model_type = keys.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ConfigError(
            f"model.config {section.config}: its config.json names no model_type; set "
            "model.overrides.model_type (a transformers model type such as 'bert')"
        )
    try:
        default = transformers.AutoConfig.for_model(model_type)
    except ValueError:
        raise ConfigError(
            f"model_type {model_type!r} is not a model type transformers knows "
            f"(transformers {transformers.__version__})"
        ) from None
    unknown = [k for k in section.overrides if k != "model_type" and not hasattr(default, k)]
    if unknown:
        raise ConfigError(
            f"model.overrides.{unknown[0]} is not an attribute of {type(default).__name__} "
            f"(model_type {model_type!r})"
        )
    if section.head in CLASSIFIERS:
        keys.pop("id2label", None)  # a saved head's labels: this head has out_features
        keys.pop("label2id", None)
        keys["num_labels"] = out_features
    try:
        return transformers.AutoConfig.for_model(model_type, **keys)
    except (TypeError, ValueError) as e:
        first = " ".join(str(e).split())[:200]
        raise ConfigError(
            f"model.overrides: {type(default).__name__} refuses them ({first})"
        ) from None


def _read_config(path: str) -> dict[str, Any]:
    """config.json of a model folder, or the file itself, as a dict."""
    try:
        if stat.S_ISDIR(check_input(path, "model.config", folder_ok=True).st_mode):
            path = os.path.join(path, CONFIG_FILE)
        data = read_bounded(path, "model.config", JSON_LIMIT)
    except InputError as e:
        raise ConfigError(str(e)) from None
    try:
        keys = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"model.config {path}: not a JSON file ({e})") from None
    if not isinstance(keys, dict):
        raise ConfigError(f"model.config {path}: not a transformers config (a JSON object)")
    return keys


def _check_fits(
    section: TransformersModel, config: Any, shape: tuple[int, ...], out_features: int
) -> None:
    """Rows of T token ids, T within the model's positions, ids within its vocabulary."""
    if len(shape) != 1:
        raise ConfigError(
            f"model.name 'transformers' needs rows of T token ids (input_ids), got rows of "
            f"shape {list(shape)}"
        )
    (tokens,) = shape
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and tokens > positions:
        raise ConfigError(
            f"model.config: the data's rows of {tokens} tokens are longer than the model's "
            f"{positions} positions (max_position_embeddings)"
        )
    vocab = getattr(config, "vocab_size", None)
    if section.head not in CLASSIFIERS and isinstance(vocab, int) and out_features > vocab:
        raise ConfigError(
            f"model.config: the data's vocabulary of {out_features} ids is larger than the "
            f"model's vocab_size {vocab}; tokenize with the model's tokenizer, or set "
            "model.overrides.vocab_size"
        )


def _import() -> Any:
    """transformers, offline: nothing this family does may reach the Hugging Face Hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "model.name 'transformers' needs the transformers package: pip install transformers"
        ) from None
    return transformers
