"""[model] holds the chosen family's keys only (a discriminated union on model.name): another
family's key is an error naming the family's own keys, --print-config shows those keys, and
configs saved before (run.json, a checkpoint's model.pt), which hold every family's keys, still
load. Plain Python, no Ray."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import jsonschema
import pytest
from torch import nn

from raymb import Config, ConfigError, load_config
from raymb.config import (
    CnnModel,
    FactoryModel,
    GptModel,
    LinearModel,
    MlpModel,
    ModelSection,
    json_schema,
    to_toml,
)
from raymb.errors import CheckpointError
from raymb.rundir import checkpoint as ckpt
from raymb.rundir.checkpoint import atomic_save, claim_run
from raymb.tools.load import load_model

# Each family's keys, written out independently of the classes.
# Every family ends with the keys of a pretrained start.
START = ["init_from", "init_allow_missing", "init_allow_unexpected", "freeze"]
KEYS = {
    "linear": ["name", "num_classes", "init", *START],
    "mlp": ["name", "hidden", "dropout", "num_classes", "init", *START],
    "cnn": ["name", "widths", "norm", "dropout", "num_classes", "init", *START],
    "gpt": [
        "name",
        "depth",
        "width",
        "heads",
        "block_size",
        "dropout",
        "num_classes",
        "init",
        *START,
    ],
    "my.models:make": ["name", "num_classes", *START],
}
CLASSES = {
    "linear": LinearModel,
    "mlp": MlpModel,
    "cnn": CnnModel,
    "gpt": GptModel,
    "my.models:make": FactoryModel,
}

# A [model] table as every config saved before this layout held it: all families' keys, at
# their defaults (raymb wrote the resolved config).
OLD_MODEL = {
    "name": "linear",
    "hidden": [64, 64],
    "num_classes": None,
    "widths": [32, 64, 128],
    "norm": "batch",
    "depth": 4,
    "width": 128,
    "heads": 4,
    "block_size": None,
    "dropout": 0.0,
}


@pytest.mark.parametrize("name", KEYS)
def test_each_family_holds_its_own_keys(name: str) -> None:
    config = load_config(None, [f"model.name={name}"])
    assert type(config.model) is CLASSES[name]
    assert list(config.to_dict()["model"]) == KEYS[name]
    assert ModelSection(name=name) == config.model
    # --print-config: the family's keys, no other's.
    text = to_toml(config)
    table = text.split("[model]\n", 1)[1].split("\n\n", 1)[0]
    printed = [line.lstrip("# ").split(" = ")[0] for line in table.splitlines()]
    assert printed == KEYS[name], table


@pytest.mark.parametrize(
    ("name", "key", "keys"),
    [
        ("linear", "hidden=[8]", "num_classes, init"),
        ("mlp", "depth=3", "hidden, dropout, num_classes, init"),
        ("cnn", "heads=2", "widths, norm, dropout, num_classes, init"),
        ("gpt", "widths=[8]", "depth, width, heads, block_size, dropout, num_classes, init"),
        ("my.models:make", "norm='group'", "num_classes"),
    ],
)
def test_another_familys_key_names_the_familys_keys(name: str, key: str, keys: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"model.name={name}", f"model.{key}"])
    wrong = key.split("=")[0]
    keys = ", ".join([keys, *START])
    assert str(info.value) == (
        f"model.{wrong} is not a key of model.name = {name!r} (its keys: {keys})"
    )


def test_a_model_table_without_a_name_is_linear(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[model]\nnum_classes = 3\n")
    assert load_config(path).model == LinearModel(num_classes=3)
    path.write_text("[model]\ndepth = 3\n")
    with pytest.raises(ConfigError, match=r"model\.depth is not a key of model\.name = 'linear'"):
        load_config(path)


def test_sections_built_in_python() -> None:
    assert ModelSection(name="mlp", hidden=[8]) == MlpModel(hidden=[8])
    assert MlpModel().name == "mlp" and GptModel().name == "gpt"
    with pytest.raises(ConfigError, match="model.depth is not a key of model.name = 'mlp'"):
        MlpModel(depth=3)
    with pytest.raises(
        ConfigError, match=r"model.name must be linear, mlp, cnn, gpt, transformers or"
    ):
        FactoryModel(name="nocolon")
    with pytest.raises(ConfigError, match="model.name must be set"):
        FactoryModel()
    with pytest.raises(ConfigError, match=r"model must be a table of keys \(got 3\)"):
        dataclasses.replace(Config(), model=3)
    mlp = dataclasses.replace(MlpModel(), hidden=[8])
    config = dataclasses.replace(Config(), model=mlp)
    assert config.model.hidden == [8]
    # The config crosses to the workers pickled.
    assert pickle.loads(pickle.dumps(config)) == config


@pytest.mark.parametrize("name", KEYS)
def test_the_schema_takes_one_family_a_table(name: str) -> None:
    schema = json_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    model = load_config(None, [f"model.name={name}"]).to_dict()["model"]
    model = {k: v for k, v in model.items() if v is not None}  # TOML leaves unset keys out
    assert list(validator.iter_errors({"model": model})) == []
    assert list(validator.iter_errors({"model": {**model, "no_such_key": 1}}))
    other = "depth" if name != "gpt" else "hidden"
    assert list(validator.iter_errors({"model": {**model, other: 3}}))


# ---------------------------------------------------------------- saved before: every key


@pytest.mark.parametrize(
    ("name", "mine"),
    [
        ("linear", {}),
        ("mlp", {"hidden": [8, 8]}),
        ("cnn", {"widths": [8, 16], "norm": "group"}),
        ("gpt", {"depth": 2, "width": 32, "heads": 4, "dropout": 0.1}),
        ("my.models:make", {"num_classes": 5}),
    ],
)
def test_a_saved_config_with_every_familys_keys_loads(name: str, mine: dict) -> None:
    saved = Config().to_dict()
    saved["model"] = {**OLD_MODEL, "name": name, **mine}
    config = Config.from_saved(saved)
    assert config.model == ModelSection(name=name, **mine)
    assert list(config.to_dict()["model"]) == KEYS[name]
    # A user's config is held to the family's keys.
    with pytest.raises(ConfigError, match="is not a key of model.name"):
        Config.from_dict(saved)


def test_a_saved_config_drops_keys_its_model_never_read() -> None:
    # A linear run whose config also set the mlp's hidden (which it never read): dropped.
    saved = Config().to_dict()
    saved["model"] = {**OLD_MODEL, "hidden": [4]}
    assert Config.from_saved(saved).model == LinearModel()


def test_an_old_run_json_resumes_and_still_guards_its_checkpoints(tmp_path: Path) -> None:
    saved = load_config(None, ["model.name=mlp"]).to_dict()
    saved["model"] = {**OLD_MODEL, "name": "mlp"}
    record = json.dumps({"format": "raymb", "config": saved})
    (tmp_path / ckpt.RUN_FILE).write_text(record)
    claim_run(tmp_path, load_config(None, ["model.name=mlp", "train.epochs=50"]))
    assert (tmp_path / ckpt.RUN_FILE).read_text() == record  # left as the run started
    with pytest.raises(CheckpointError) as info:
        claim_run(tmp_path, load_config(None, ["model.name=mlp", "model.hidden=[8]"]))
    assert "checkpoint of model 'mlp' (hidden [64, 64])" in str(info.value)
    with pytest.raises(CheckpointError) as info:
        claim_run(tmp_path, load_config(None, ["model.name=linear"]))
    message = str(info.value)
    assert "asks for model 'linear'" in message
    assert "--set model.name='mlp', --set model.hidden=[64,64]" in message


def test_an_old_checkpoint_loads(tmp_path: Path) -> None:
    config = load_config(None, ["model.name=mlp", "model.hidden=[4]"]).to_dict()
    config["model"] = {**OLD_MODEL, "name": "mlp", "hidden": [4]}
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    payload = ckpt.model_payload(model, config, 3, 1, classify=False)
    atomic_save(payload, tmp_path / ckpt.MODEL_FILE)
    loaded, _ = load_model(tmp_path)
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in model.parameters()]
