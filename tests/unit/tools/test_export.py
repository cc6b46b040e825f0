"""raymb export: each built-in model to safetensors, ONNX and TorchScript, without Ray.

Each file is read back by its format's own reader (safetensors.torch.load_file,
onnxruntime, torch.jit.load) and compared with the model the test built, on rows of
another batch size (and, for the gpt, a shorter block) than export traced or checked with.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from raymb.cli import main
from raymb.core.shape import InputShape
from raymb.load import load_config
from raymb.models import build_model
from raymb.rundir.checkpoint import MODEL_FILE, atomic_save, model_payload
from raymb.tools.export import CHECK_ROWS, export, rebuild

ROWS = 3  # neither export's trace batch nor its check batch
T, VOCAB = 8, 256  # gpt: tokens per row, vocabulary (the byte tokenizer's)

# name -> (config overrides, inputs, out_features, tokenizer)
MODELS = {
    "linear": (["model.name=linear"], InputShape(task="regress", shape=(5,)), 1, None),
    "mlp": (
        ["model.name=mlp", "model.hidden=[8,8]"],
        InputShape(task="classify", shape=(5,)),
        3,
        None,
    ),
    "cnn-batch": (
        ["model.name=cnn", "model.widths=[8,16]", "model.norm='batch'"],
        InputShape(task="classify", shape=(3, 8, 8), scale=1 / 255),
        4,
        None,
    ),
    "cnn-group": (
        ["model.name=cnn", "model.widths=[8,16]", "model.norm='group'"],
        InputShape(task="classify", shape=(3, 8, 8), mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2)),
        4,
        None,
    ),
    "gpt": (
        ["model.name=gpt", "model.depth=2", "model.width=32", "model.heads=4"],
        InputShape(task="lm", shape=(T + 1,)),
        VOCAB,
        {"kind": "bytes"},
    ),
}
FORMATS = ("safetensors", "onnx", "torchscript")


def _checkpoint(directory: Path, name: str) -> tuple[Path, nn.Module, dict]:
    """A model.pt as a run writes it; the model (eval mode) and the payload it holds."""
    overrides, inputs, out_features, tokenizer = MODELS[name]
    config = load_config(None, overrides)
    torch.manual_seed(0)
    model = build_model(config.model, inputs.model_shape, out_features)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # running statistics a train-mode export misses
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.num_batches_tracked.fill_(7)
    payload = model_payload(
        model,
        config.to_dict(),
        inputs.in_features,
        out_features,
        inputs.task != "regress",
        inputs=inputs.to_dict(),
        tokenizer=tokenizer,
    )
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save(payload, directory / MODEL_FILE)
    return directory / MODEL_FILE, model.eval(), payload


def _rows(name: str, tokens: int = T) -> torch.Tensor:
    g = torch.Generator().manual_seed(42)
    inputs = MODELS[name][1]
    if inputs.task == "lm":
        return torch.randint(0, VOCAB, (ROWS, tokens), generator=g)
    return torch.randn(ROWS, *inputs.shape, generator=g)


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("name", MODELS)
def test_safetensors_holds_the_state_dict_and_what_rebuilds_the_model(tmp_path, name):
    path, model, payload = _checkpoint(tmp_path / "ckpt", name)
    out = tmp_path / "model.safetensors"
    written = export(path, "safetensors", out)
    assert written == {
        "out": str(out),
        "format": "safetensors",
        "bytes": out.stat().st_size,
        "max_abs_diff": 0.0,
        "rows": CHECK_ROWS,
    }
    tensors = load_file(str(out))
    state = model.state_dict()
    assert sorted(tensors) == sorted(state)  # the gpt's tied head included, as its own copy
    for key, tensor in state.items():
        assert tensors[key].dtype == tensor.dtype and torch.equal(tensors[key], tensor), key
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    for key in ("config", "inputs", "in_features", "out_features", "classify", "tokenizer"):
        assert json.loads(metadata[f"raymb.{key}"]) == payload[key], key
    rebuilt, rebuilt_payload = rebuild(out)
    assert rebuilt_payload == {
        k: v for k, v in payload.items() if k not in ("format", "state_dict")
    }
    x = _rows(name)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))
    if name == "gpt":
        assert rebuilt.head.weight is rebuilt.tokens.weight


@pytest.mark.parametrize("name", MODELS)
def test_onnx_matches_torch_on_another_batch_size(tmp_path, name):
    path, model, payload = _checkpoint(tmp_path / "ckpt", name)
    out = tmp_path / "model.onnx"
    written = export(path, "onnx", out)
    assert written["max_abs_diff"] < 1e-5 and written["bytes"] == out.stat().st_size
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    blocks = [_rows(name), _rows(name, tokens=5)] if name == "gpt" else [_rows(name)]
    for x in blocks:
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            want = model(x)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=1e-5)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["raymb.inputs"]) == payload["inputs"]
    assert json.loads(props["raymb.config"]) == payload["config"]
    assert json.loads(props["raymb.out_features"]) == payload["out_features"]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", MODELS)
def test_torchscript_matches_torch_on_another_batch_size(tmp_path, name):
    path, model, payload = _checkpoint(tmp_path / "ckpt", name)
    out = tmp_path / "model.pt"
    export(path, "torchscript", out)
    extra = {"raymb.inputs": "", "raymb.classify": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    blocks = [_rows(name), _rows(name, tokens=5)] if name == "gpt" else [_rows(name)]
    for x in blocks:
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)
    assert json.loads(extra["raymb.inputs"]) == payload["inputs"]
    assert json.loads(extra["raymb.classify"]) == payload["classify"]


def test_cli_prints_one_line_and_leaves_only_the_file(tmp_path, capsys):
    path, _, _ = _checkpoint(tmp_path / "ckpt", "mlp")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "mlp.onnx"
    assert (
        main(["export", "--checkpoint", str(path.parent), "--format", "onnx", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr()
    assert re.fullmatch(
        rf"raymb: wrote {re.escape(str(out))} \(onnx, [\d.]+ (B|kB); max abs difference vs "
        rf"torch [-+.e\d]+ on {CHECK_ROWS} rows\)\n",
        printed.out,
    ), printed.out
    assert printed.err == ""
    assert _files(out_dir) == ["mlp.onnx"]


def _refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    lines = printed.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("raymb: error: "), printed.err
    return lines[0]


def test_cli_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    path, _, _ = _checkpoint(tmp_path / "ckpt", "linear")
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def argv(checkpoint=path, fmt="onnx", out=out_dir / "m.onnx"):
        return ["export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out)]

    assert "checkpoint file not found" in _refused(capsys, argv(checkpoint=tmp_path / "none"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert "not a raymb checkpoint" in _refused(capsys, argv(checkpoint=garbage))
    missing = tmp_path / "missing" / "m.onnx"
    assert f"no such directory {missing.parent}" in _refused(capsys, argv(out=missing))
    assert "is a directory" in _refused(capsys, argv(out=out_dir))
    assert "the checkpoint itself" in _refused(capsys, argv(fmt="torchscript", out=path))
    assert _files(path.parent) == [MODEL_FILE]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime: ImportError
    assert _refused(capsys, argv()) == (
        "raymb: error: raymb export --format onnx needs the onnx and onnxruntime packages: "
        "pip install 'raymb[export]'"
    )
    monkeypatch.setitem(sys.modules, "safetensors", None)
    assert "needs the safetensors package" in _refused(capsys, argv(fmt="safetensors"))
    with pytest.raises(SystemExit) as e:  # argparse's choices
        main(argv(fmt="tflite"))
    assert e.value.code == 2
    assert _files(out_dir) == [] and not missing.parent.exists()


@pytest.fixture
def branchy_factory(tmp_path, monkeypatch):
    """A custom model whose output depends on a Python float taken from its input: a trace
    bakes the traced batch's value in, so the export differs from torch on other rows."""
    (tmp_path / "branchy_models.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Branchy(torch.nn.Module):
                def __init__(self, d, out):
                    super().__init__()
                    self.lin = torch.nn.Linear(d, out)

                def forward(self, x):
                    return self.lin(x) * float(x.abs().max())

            def make(d, out):
                return Branchy(d, out)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "branchy_models:make"
    sys.modules.pop("branchy_models", None)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_export_that_differs_from_torch_is_refused_and_removed(
    tmp_path, capsys, branchy_factory, fmt
):
    config = load_config(None, [f"model.name='{branchy_factory}'"])
    model = build_model(config.model, (5,), 1)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    atomic_save(model_payload(model, config.to_dict(), 5, 1, False), ckpt / MODEL_FILE)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # A custom factory runs only with the user's consent (issue 20).
    argv = ["export", "--checkpoint", str(ckpt), "--format", fmt, "--out", str(out_dir / "m")]
    argv.append("--trust-model-code")
    assert "differs from torch" in _refused(capsys, argv)
    assert _files(out_dir) == []
    # safetensors holds the weights only: the model rebuilt from it is the model itself
    safetensors = [*argv[:4], "safetensors", "--out", str(out_dir / "m"), "--trust-model-code"]
    assert main(safetensors) == 0
    assert _files(out_dir) == ["m"]
