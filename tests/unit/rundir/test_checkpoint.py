"""raymb.rundir.checkpoint: atomic writes, and every unreadable or foreign checkpoint refused
in one line.

Real files on disk throughout: torch.save, truncation by hand, pickles of other things.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from raymb.errors import CheckpointError
from raymb.load import load_config
from raymb.rundir import checkpoint as ckpt
from raymb.rundir.checkpoint import atomic_save, check_compatible, claim_run, read
from raymb.tools.load import load_model


def _linear_payload(config_overrides=(), model: nn.Module | None = None, in_features: int = 2):
    config = load_config(None, ["model.name=linear", *config_overrides])
    torch.manual_seed(0)
    model = model if model is not None else nn.Linear(in_features, 1)
    return ckpt.model_payload(model, config.to_dict(), in_features, 1, classify=False), model


def _refused(path: Path, load=read) -> str:
    with pytest.raises(CheckpointError) as info:
        load(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: "), msg
    return msg


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


# --- writing ------------------------------------------------------------------------------


def test_model_round_trip(tmp_path):
    payload, model = _linear_payload()
    atomic_save(payload, tmp_path / ckpt.MODEL_FILE)
    loaded, saved = load_model(tmp_path)  # a checkpoint directory works as well as the file
    assert saved["in_features"] == 2
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_failed_save_keeps_the_previous_file_and_leaves_no_partial_one(tmp_path):
    path = tmp_path / ckpt.STATE_FILE
    atomic_save({"format": "raymb", "step": 1}, path)
    before = path.read_bytes()
    # The tensor is written out before the pickler reaches the object that fails.
    bad = {"format": "raymb", "step": 2, "big": torch.ones(1 << 16), "bad": _Unpicklable()}
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        atomic_save(bad, path)
    assert path.read_bytes() == before
    assert read(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.STATE_FILE]


# --- reading: refused, one line naming the file ---------------------------------------------


@pytest.mark.parametrize("name", [ckpt.MODEL_FILE, ckpt.STATE_FILE])
@pytest.mark.parametrize("keep", [0.5, 0.9, 10], ids=["half", "most", "ten-bytes"])
def test_truncated_file_is_refused(tmp_path, name, keep):
    payload, _ = _linear_payload()
    whole = tmp_path / "whole.pt"
    atomic_save(payload if name == ckpt.MODEL_FILE else {"format": "raymb", "step": 3}, whole)
    data = whole.read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    msg = _refused(path)
    assert "not a readable raymb checkpoint" in msg and "truncated or corrupted" in msg
    _refused(path, load_model)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "an empty file"),
        (b"step: 3\nloss: 0.1\n", "not a torch checkpoint file"),
        (pickle.dumps({"format": "raymb"}), "not a torch checkpoint file"),
    ],
    ids=["empty", "text", "plain-pickle"],
)
def test_file_that_is_not_a_torch_file_is_refused(tmp_path, content, words):
    path = tmp_path / ckpt.MODEL_FILE
    path.write_bytes(content)
    assert words in _refused(path)


def test_torch_file_with_foreign_objects_is_refused_without_running_them(tmp_path):
    path = tmp_path / ckpt.MODEL_FILE
    torch.save(nn.Linear(2, 1), path)  # a whole pickled module: weights_only refuses it
    assert "weights_only loading refuses" in _refused(path)


@pytest.mark.parametrize(
    "obj",
    [
        {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)},  # a bare state_dict
        {"format": "other", "state_dict": {}},
        [torch.zeros(1)],
    ],
    ids=["state-dict", "other-format", "list"],
)
def test_torch_file_that_is_not_a_raymb_checkpoint_is_refused(tmp_path, obj):
    path = tmp_path / ckpt.MODEL_FILE
    torch.save(obj, path)
    assert "not a raymb checkpoint" in _refused(path)


def test_state_file_given_as_a_model_is_refused(tmp_path):
    path = tmp_path / ckpt.STATE_FILE
    atomic_save({"format": "raymb", "optimizer": {}, "progress": {}}, path)
    assert "without a model" in _refused(path, load_model)


def test_checkpoint_of_another_shape_is_refused_by_load_model(tmp_path):
    # The config says linear with 3 inputs; the weights are those of a 2-input linear model.
    payload, _ = _linear_payload(model=nn.Linear(2, 1), in_features=3)
    path = tmp_path / ckpt.MODEL_FILE
    atomic_save(payload, path)
    msg = _refused(path, load_model)
    assert "does not fit model 'linear'" in msg
    assert "weight: checkpoint has [1, 2], the model [1, 3]" in msg


def test_checkpoint_of_another_architecture_is_refused_by_load_model(tmp_path):
    # An mlp's config with a linear model's weights: different parameter names altogether.
    config = load_config(None, ["model.name=mlp", "model.hidden=[4]"])
    payload = ckpt.model_payload(nn.Linear(2, 1), config.to_dict(), 2, 1, classify=False)
    path = tmp_path / ckpt.MODEL_FILE
    atomic_save(payload, path)
    msg = _refused(path, load_model)
    assert "does not fit model 'mlp'" in msg and "missing 0.weight" in msg


def test_checkpoint_whose_config_no_longer_builds_is_refused(tmp_path):
    payload, _ = _linear_payload()
    payload["config"]["model"]["name"] = "no_such_package.models:build"
    path = tmp_path / ckpt.MODEL_FILE
    atomic_save(payload, path)
    assert "cannot rebuild its model" in _refused(path, load_model)


# --- run.json: a resumed run must be able to load its own checkpoints ----------------------


def test_claim_run_records_the_config_once(tmp_path):
    config = load_config(None, ["model.name=mlp", "run.name=r"])
    claim_run(tmp_path, config)
    record = json.loads((tmp_path / ckpt.RUN_FILE).read_text())
    assert record == {"format": "raymb", "config": config.to_dict()}
    before = (tmp_path / ckpt.RUN_FILE).read_bytes()
    # Resuming with changes a checkpoint survives (more epochs, another lr) is allowed and
    # leaves the record as the run started.
    claim_run(tmp_path, load_config(None, ["model.name=mlp", "train.epochs=50", "optim.lr=0.1"]))
    assert (tmp_path / ckpt.RUN_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.RUN_FILE]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            ["model.name=linear"],
            ["checkpoint of model 'mlp' (hidden [64, 64])", "asks for model 'linear'"],
        ),
        (["model.hidden=[8]"], ["asks for model 'mlp' (hidden [8])", "model.hidden=[64,64]"]),
        (['data.features="x"'], ["data.features='features'", "asks for data.features='x'"]),
        (['data.label="y"'], ["data.label='label'", "asks for data.label='y'"]),
        (['train.sync="param"'], ["train.sync='grad'", "asks for train.sync='param'"]),
        (['optim.name="adam"'], ["optim.name='sgd'", "asks for optim.name='adam'"]),
    ],
    ids=["model", "hidden", "features", "label", "sync", "optimizer"],
)
def test_claim_run_refuses_a_config_its_checkpoints_cannot_load(tmp_path, overrides, words):
    claim_run(tmp_path, load_config(None, ["model.name=mlp"]))
    before = (tmp_path / ckpt.RUN_FILE).read_bytes()
    with pytest.raises(CheckpointError) as info:
        claim_run(tmp_path, load_config(None, ["model.name=mlp", *overrides]))
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{tmp_path / ckpt.RUN_FILE}: checkpoint of model 'mlp'")
    assert "use another run.name or resume with --set " in msg
    for w in words:
        assert w in msg, (w, msg)
    assert (tmp_path / ckpt.RUN_FILE).read_bytes() == before


def test_check_compatible_ignores_what_the_model_does_not_use(tmp_path):
    # A run.json from before [model] held one family's keys: a linear model with the mlp's
    # hidden (and the cnn's and the gpt's keys). hidden means nothing to a linear model;
    # num_classes unset follows the data.
    saved = load_config(None).to_dict()
    saved["model"] = {"name": "linear", "hidden": [4], "num_classes": None, "widths": [32, 64]}
    saved["model"] |= {"norm": "batch", "depth": 4, "width": 128, "heads": 4, "block_size": None}
    saved["model"]["dropout"] = 0.0
    check_compatible(saved, load_config(None), tmp_path)
    check_compatible(saved, load_config(None, ["model.num_classes=3"]), tmp_path)
    saved["model"]["num_classes"] = 3
    with pytest.raises(CheckpointError, match="num_classes 3"):
        check_compatible(saved, load_config(None, ["model.num_classes=4"]), tmp_path)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "not a readable raymb run record"),
        ('{"format": "other"}', "not a raymb run record"),
        ('{"format": "raymb", "config": {}}', "not a raymb run record"),
    ],
    ids=["not-json", "other-format", "no-model"],
)
def test_claim_run_refuses_a_foreign_run_record(tmp_path, text, words):
    (tmp_path / ckpt.RUN_FILE).write_text(text)
    with pytest.raises(CheckpointError) as info:
        claim_run(tmp_path, load_config(None))
    assert str(info.value).startswith(f"{tmp_path / ckpt.RUN_FILE}: {words}")
    assert "\n" not in str(info.value)


def test_claim_run_lets_a_run_resume_with_another_number_of_workers(tmp_path):
    claim_run(tmp_path, load_config(None, ["scale.workers=2"]))
    claim_run(
        tmp_path, load_config(None, ["scale.workers=4"])
    )  # raymb.core.plan: steps keep their rows
