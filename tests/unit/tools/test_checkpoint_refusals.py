"""Issue 20, items 2, 4 and 9: a checkpoint runs no code of its choosing, predict never writes
over its input, and a malformed model.pt is one line.

Checkpoints are made with raymb.rundir.checkpoint's own model_payload and atomic_save from fresh
models (nothing is trained); a crafted one names a factory in a package written to
tmp_path that leaves a marker file when imported and when called. The refusals run
`raymb` as a new process (so nothing was imported before); the trusted runs call
raymb.cli.main in this process and check the numbers against numpy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_refused, run_raymb, tree

from raymb import Config
from raymb.cli import main
from raymb.errors import CheckpointError
from raymb.rundir.checkpoint import MODEL_FILE, atomic_save, model_payload

pytestmark = pytest.mark.timeout(120)

FEATURES = ["a", "b", "c"]
D = len(FEATURES)
EVIL = "evil_pkg.evil:build"  # imported: writes imported.txt; called: writes ran.txt
LINEAR = "good_pkg.models:linear"  # a real factory: torch.nn.Linear(d, out)
BIGRAM = "good_pkg.models:bigram"  # a real language model: logits = table[token]


# ---------------------------------------------------------------- helpers


def write_packages(code: Path, markers: Path) -> None:
    """evil_pkg (its import and its call each leave a marker in `markers`) and good_pkg."""
    (code / "evil_pkg").mkdir(parents=True)
    (code / "evil_pkg" / "__init__.py").write_text("")
    (code / "evil_pkg" / "evil.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path

            Path({str(markers / "imported.txt")!r}).write_text("imported")

            def build(*args, **kwargs):
                Path({str(markers / "ran.txt")!r}).write_text("ran")
            """
        )
    )
    (code / "good_pkg").mkdir()
    (code / "good_pkg" / "__init__.py").write_text("")
    (code / "good_pkg" / "models.py").write_text(
        textwrap.dedent(
            """
            import torch

            def linear(d, out):
                return torch.nn.Linear(d, out)

            class Bigram(torch.nn.Module):
                def __init__(self, vocab):
                    super().__init__()
                    self.table = torch.nn.Embedding(vocab, vocab)

                def forward(self, idx):
                    return self.table(idx)

            def bigram(tokens, vocab):
                return Bigram(vocab)
            """
        )
    )


def config_dict(name: str, **model) -> dict:
    return Config.from_dict(
        {"data": {"features": FEATURES, "label": "label"}, "model": {"name": name, **model}}
    ).to_dict()


def save(directory: Path, payload: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_save(payload, directory / MODEL_FILE)
    return directory / MODEL_FILE


def regressor(directory: Path, name: str, seed: int = 0) -> tuple[Path, torch.nn.Linear]:
    """model.pt of a D -> 1 regressor (the weights of a seeded nn.Linear) under model.name."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(D, 1)
    payload = model_payload(
        model,
        config_dict(name),
        D,
        1,
        False,
        inputs={"task": "regress", "shape": [D], "scale": None, "mean": None, "std": None},
    )
    return save(directory, payload), model


def language_model(directory: Path, name: str, table: torch.Tensor | None = None) -> Path:
    """model.pt of a byte-level language model on blocks of 8 tokens, under model.name."""
    model = torch.nn.Module()
    model.table = torch.nn.Embedding(256, 256)
    if table is not None:
        model.table.weight.data.copy_(table)
    payload = model_payload(
        model,
        config_dict(name),
        9,
        256,
        True,
        inputs={"task": "lm", "shape": [9], "scale": None, "mean": None, "std": None},
        tokenizer={"kind": "bytes"},
    )
    return save(directory, payload)


def write_data(path: Path, rows: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, D)).astype(np.float32)
    y = rng.normal(size=rows).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({**{c: x[:, i] for i, c in enumerate(FEATURES)}, "label": y}), path)
    return x, y


def one_line(capsys, argv: list[str]) -> str:
    """raymb.cli.main(argv) in this process: exit 2 and one line on stderr; returns it."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("raymb: error: "), err
    return lines[0]


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """tmp_path/work, where the commands run; the packages in tmp_path/code, importable by
    the processes this test starts (PYTHONPATH) and by this one (sys.path)."""
    code = tmp_path / "code"
    write_packages(code, tmp_path / "work")
    monkeypatch.setenv("PYTHONPATH", str(code))
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delenv("RAYMB_TRUST_MODEL_CODE", raising=False)
    (tmp_path / "work").mkdir()
    yield tmp_path / "work"
    for name in [m for m in sys.modules if m.split(".")[0] in ("evil_pkg", "good_pkg")]:
        del sys.modules[name]


def no_markers(work: Path) -> bool:
    return not (work / "imported.txt").exists() and not (work / "ran.txt").exists()


# ---------------------------------------------------------------- item 2: no code unasked


def _commands(work: Path) -> dict[str, list[str]]:
    flat = str(regressor(work / "evil", EVIL)[0].parent)
    lm = str(language_model(work / "evil-lm", EVIL).parent)
    data = str(work / "data.parquet")
    return {
        "eval": ["eval", "--checkpoint", flat, "--data", data],
        "predict": ["predict", "--checkpoint", flat, "--data", data, "--out", "p.parquet"],
        "export": ["export", "--checkpoint", flat, "--format", "torchscript", "--out", "m.pt"],
        "sample": ["sample", "--checkpoint", lm, "--prompt", "hi", "--tokens", "3"],
    }


@pytest.mark.parametrize("command", ["eval", "predict", "export", "sample"])
def test_a_checkpoints_factory_is_neither_imported_nor_called_without_the_flag(work, command):
    write_data(work / "data.parquet")
    args = _commands(work)[command]
    checkpoint = Path(args[2]) / MODEL_FILE
    line = assert_refused(
        args, work, EVIL, str(checkpoint), "--trust-model-code", "RAYMB_TRUST_MODEL_CODE=1"
    )
    assert "custom factory" in line
    assert no_markers(work)
    # Only 1 trusts: any other value of the variable is no consent.
    assert_refused(args, work, EVIL, env={"RAYMB_TRUST_MODEL_CODE": "0"})
    assert no_markers(work)


def test_a_refusal_imports_no_torch(work):
    # Importing torch takes a second or more: the checks before a model is built run first.
    write_data(work / "data.parquet")
    args = _commands(work)["eval"]
    root = Path(__file__).resolve().parents[3]
    code = (
        "import sys; from raymb.cli import main; print(main(sys.argv[1:]), 'torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=work,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ["PYTHONPATH"]])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.split() == ["2", "False"], proc.stderr
    assert "custom factory" in proc.stderr and no_markers(work)


def test_with_the_flag_a_factory_that_returns_no_module_is_refused_in_one_line(work):
    data = work / "data.parquet"
    write_data(data)
    checkpoint = regressor(work / "evil", EVIL)[0]
    result = run_raymb(
        ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--trust-model-code"], work
    )
    assert result.returncode == 2
    assert f"model.name {EVIL!r} returned NoneType, not a torch.nn.Module" in result.line
    assert (work / "ran.txt").read_text() == "ran"  # trusted: it ran, and was refused


def test_with_the_flag_a_real_factory_evaluates_and_predicts(work, capsys):
    data = work / "data.parquet"
    x, y = write_data(data)
    checkpoint, model = regressor(work / "ckpt", LINEAR, seed=3)
    w, b = model.weight.detach().double().numpy(), model.bias.detach().double().numpy()
    expected = (x.astype(np.float64) @ w.T + b)[:, 0]

    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data)]) == 2
    assert "--trust-model-code" in capsys.readouterr().err
    argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--trust-model-code"]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == {
        "loss": pytest.approx(((expected - y) ** 2).mean(), rel=1e-5),
        "accuracy": None,
        "rows": 20,
    }

    out = work / "preds.parquet"
    argv = ["predict", "--checkpoint", str(checkpoint.parent), "--data", str(data)]
    assert main([*argv, "--out", str(out), "--trust-model-code"]) == 0
    predicted = pq.read_table(out).column("prediction").to_numpy()
    np.testing.assert_allclose(predicted, expected, rtol=1e-5, atol=1e-6)


def test_the_environment_variable_trusts_as_the_flag_does(work, capsys, monkeypatch):
    data = work / "data.parquet"
    write_data(data)
    checkpoint, _ = regressor(work / "ckpt", LINEAR)
    monkeypatch.setenv("RAYMB_TRUST_MODEL_CODE", "1")
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(data)]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 20


def test_with_the_flag_a_real_factory_exports_and_samples(work, capsys):
    from raymb.tools.export import rebuild

    checkpoint, model = regressor(work / "ckpt", LINEAR, seed=5)
    out = work / "m.safetensors"
    argv = ["export", "--checkpoint", str(checkpoint), "--format", "safetensors"]
    assert main([*argv, "--out", str(out), "--trust-model-code"]) == 0
    assert capsys.readouterr().out.startswith(f"raymb: wrote {out} (safetensors")
    # The exported file names the same factory: rebuilding it asks for trust again.
    with pytest.raises(CheckpointError, match="--trust-model-code"):
        rebuild(out)
    rebuilt, _ = rebuild(out, trust_model_code=True)
    assert torch.equal(rebuilt.weight, model.weight) and torch.equal(rebuilt.bias, model.bias)

    # A bigram table whose largest logit after byte i is byte i + 1: greedy sampling (T = 0)
    # continues "ab" with "cdef", worked out by hand.
    table = torch.zeros(256, 256)
    table[torch.arange(256), (torch.arange(256) + 1) % 256] = 1.0
    lm = language_model(work / "lm", BIGRAM, table)
    argv = ["sample", "--checkpoint", str(lm), "--prompt", "ab", "--tokens", "4"]
    assert main([*argv, "--temperature", "0", "--json", "--trust-model-code"]) == 0
    drawn = json.loads(capsys.readouterr().out)
    assert drawn["text"] == "cdef" and drawn["tokens"] == [99, 100, 101, 102]


def test_with_the_flag_a_builtin_is_still_refused_and_kills_nothing(work, capsys):
    # The probe: model.name os:kill, in_features a process id, out_features SIGTERM.
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        config = config_dict("os:kill")
        payload = model_payload(torch.nn.Linear(1, 1), config, victim.pid, 15, True)
        checkpoint = save(work / "kill", payload)
        argv = ["export", "--checkpoint", str(checkpoint), "--format", "torchscript"]
        line = one_line(capsys, [*argv, "--out", str(work / "m.pt"), "--trust-model-code"])
        assert "'os:kill': kill is a builtin function, not a model factory" in line
        time.sleep(0.2)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize(
    "name",
    ["evil_pkg.evil:build.__call__", "evil_pkg..evil:build", "evil_pkg/evil:build", ":build"],
)
def test_with_the_flag_a_name_that_is_not_package_module_callable_is_never_imported(
    work, capsys, name
):
    write_data(work / "data.parquet")
    checkpoint, _ = regressor(work / "ckpt", name)
    argv = ["eval", "--checkpoint", str(checkpoint), "--data", str(work / "data.parquet")]
    line = one_line(capsys, [*argv, "--trust-model-code"])
    assert f"model.name {name!r}: expected package.module:factory" in line
    assert no_markers(work)


# ---------------------------------------------------------------- item 9: malformed fields


def _set(key, value):
    def change(payload):
        payload[key] = value

    return change


def _drop(key):
    return lambda payload: payload.pop(key)


def _inputs(**changes):
    def change(payload):
        payload["inputs"] = {**payload["inputs"], **changes}

    return change


def _model(**changes):
    def change(payload):
        payload["config"]["model"].update(changes)

    return change


def _huge_view(payload):
    # 2**30 inputs stored as one float repeated (stride 0): the file is small, the model not.
    payload["in_features"] = 2**30
    payload["inputs"] = {**payload["inputs"], "shape": [2**30]}
    payload["state_dict"]["weight"] = torch.zeros(1).as_strided((1, 2**30), (0, 0))


def _nested(payload):
    # One list inside itself 2 x 40 times: a small file whose config holds 2**40 values.
    nested = [0]
    for _ in range(40):
        nested = [nested, nested]
    payload["config"]["model"]["hidden"] = nested


MALFORMED = {
    "shape-not-a-number": (_inputs(shape=["x"]), "inputs.shape is ['x']"),
    "shape-of-10**12": (_inputs(shape=[10**12]), "inputs.shape is [1000000000000]"),
    "shape-of-no-values": (_inputs(shape=[]), "inputs.shape is []"),
    "in-features-10**12": (_set("in_features", 10**12), "in_features is 1000000000000"),
    "in-features-not-the-shape": (_set("in_features", 4), "in_features is 4, expected 3"),
    "out-features-text": (_set("out_features", "abc"), "out_features is 'abc'"),
    "out-features-true": (_set("out_features", True), "out_features is True"),
    "out-features-10**12": (_set("out_features", 10**12), "out_features is 1000000000000"),
    "config-a-string": (
        _set("config", "model.name = 'os:kill'"),
        "config is \"model.name = 'os:kill'\"",
    ),
    "config-without-model": (_set("config", {"data": {}}), "config is {'data': {}}"),
    "model-name-a-number": (_model(name=5), "model.name"),
    "missing-state-dict": (_drop("state_dict"), "without a model (no state_dict)"),
    "missing-config": (_drop("config"), "without a model (no config)"),
    "classify-text": (_set("classify", "no"), "classify is 'no'"),
    "classify-not-the-task": (_set("classify", True), "classify is True"),
    "inputs-a-list": (_set("inputs", [3]), "inputs is [3]"),
    "task-unknown": (_inputs(task="rank"), "inputs.task is 'rank'"),
    "scale-infinite": (_inputs(scale=float("inf")), "inputs.scale is inf"),
    "scale-10**400": (_inputs(scale=10**400), "inputs.scale is 10000"),
    "config-of-2**40-values": (_nested, "config holds more than 100000 values"),
    "mean-without-std": (_inputs(mean=[0.0]), "inputs.std is None"),
    "std-zero": (_inputs(mean=[0.0], std=[0.0]), "inputs.std is [0.0]"),
    "tokenizer-text": (_set("tokenizer", "bytes"), "tokenizer is 'bytes'"),
    "state-dict-a-list": (_set("state_dict", [1, 2]), "state_dict is [1, 2]"),
    "state-dict-a-stride-0-view": (_huge_view, "state_dict['weight'] is [1, 1073741824]"),
    # Shapes the tensors cannot fit: refused from shapes alone, nothing of that size made.
    "mlp-of-10**9-wide": (_model(name="mlp", hidden=[10**9]), "does not fit model 'mlp'"),
    "gpt-of-10**30-wide": (
        _model(name="gpt", depth=1, width=10**30, heads=1),
        "model.width is 1000000000000000000000000000000",
    ),
    "cnn-of-10**15-channels": (_model(name="cnn", widths=[10**15]), "model.widths is [10000000"),
    "gpt-of-10**9-blocks": (
        _model(name="gpt", depth=10**9, width=8, heads=2),
        "model.depth asks for 1000000000 layers",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_checkpoint_is_one_line_naming_the_field(tmp_path, capsys, case):
    change, words = MALFORMED[case]
    data = tmp_path / "data.parquet"
    write_data(data)
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 1)
    inputs = {"task": "regress", "shape": [D], "scale": None, "mean": None, "std": None}
    payload = model_payload(model, config_dict("linear"), D, 1, False, inputs=inputs)
    change(payload)
    checkpoint = save(tmp_path / "ckpt", payload)
    before = tree(tmp_path)
    start = time.monotonic()
    line = one_line(capsys, ["eval", "--checkpoint", str(checkpoint), "--data", str(data)])
    assert time.monotonic() - start < 2.0, "refused from the fields, nothing allocated"
    assert line.startswith(f"raymb: error: {checkpoint}: ") and words in line, line
    assert tree(tmp_path) == before


@pytest.mark.parametrize("command", ["predict", "export", "sample"])
def test_every_tool_checks_the_fields(tmp_path, capsys, command):
    write_data(tmp_path / "data.parquet")
    lm = command == "sample"
    checkpoint = (language_model if lm else regressor)(tmp_path / "ckpt", "linear")
    checkpoint = checkpoint if lm else checkpoint[0]
    payload = torch.load(checkpoint, weights_only=True)
    payload["inputs"]["shape"] = ["x"]
    atomic_save(payload, checkpoint)
    argv = {
        "predict": ["--data", str(tmp_path / "data.parquet"), "--out", str(tmp_path / "p")],
        "export": ["--format", "torchscript", "--out", str(tmp_path / "m.pt")],
        "sample": ["--prompt", "hi", "--tokens", "2"],
    }[command]
    line = one_line(capsys, [command, "--checkpoint", str(checkpoint), *argv])
    assert "malformed checkpoint: inputs.shape is ['x']" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "data.parquet"]


# ---------------------------------------------------------------- item 4: predict's --out


def _layout(tmp_path: Path) -> tuple[Path, Path]:
    """A data folder of two parquet files, a regressor's checkpoint directory; links into
    them: a file link, a folder link, a hard link."""
    data = tmp_path / "data"
    write_data(data / "part-0.parquet", seed=0)
    write_data(data / "part-1.parquet", seed=1)
    checkpoint, _ = regressor(tmp_path / "ckpt", "linear")
    (tmp_path / "file-link.parquet").symlink_to(data / "part-0.parquet")
    (tmp_path / "folder-link").symlink_to(data)
    os.link(data / "part-1.parquet", tmp_path / "hard-link.parquet")
    return data, checkpoint


OWN_INPUTS = {
    # name: (--data, --out, words), paths relative to tmp_path
    "out-is-the-data-file": ("data/part-0.parquet", "data/part-0.parquet", "is the input"),
    "out-is-a-file-of-the-folder": ("data", "data/part-1.parquet", "is inside the input"),
    "out-is-inside-the-data-folder": ("data", "data/preds.parquet", "is inside the input"),
    "out-is-a-file-of-a-glob": ("data/*.parquet", "data/part-1.parquet", "is the input"),
    "out-links-to-the-data-file": ("data/part-0.parquet", "file-link.parquet", "is the input"),
    "out-through-a-folder-link": ("data", "folder-link/new.parquet", "is inside the input"),
    "data-through-a-folder-link": ("folder-link", "data/new.parquet", "is inside the input"),
    "out-a-hard-link-to-the-data": ("data/part-1.parquet", "hard-link.parquet", "is the input"),
    "out-is-the-checkpoint": ("data", "ckpt/model.pt", "(--checkpoint)"),
    "out-is-inside-the-checkpoint": ("data", "ckpt/preds.parquet", "(--checkpoint)"),
}


@pytest.mark.parametrize("case", sorted(OWN_INPUTS))
def test_predict_refuses_an_out_that_is_or_is_inside_an_input(tmp_path, capsys, case):
    data, out, words = OWN_INPUTS[case]
    _, checkpoint = _layout(tmp_path)
    before = tree(tmp_path)
    argv = ["predict", "--checkpoint", str(checkpoint.parent), "--data", str(tmp_path / data)]
    line = one_line(capsys, [*argv, "--out", str(tmp_path / out)])
    assert line.startswith(f"raymb: error: --out: {tmp_path / out} ") and words in line, line
    assert tree(tmp_path) == before  # every input byte-identical, nothing new


def test_predict_out_as_its_data_file_is_refused_by_the_command(tmp_path):
    data, checkpoint = _layout(tmp_path)
    original = (data / "part-0.parquet").read_bytes()
    args = ["predict", "--checkpoint", str(checkpoint), "--data", "data/part-0.parquet"]
    assert_refused([*args, "--out", "data/part-0.parquet"], tmp_path, "--out: data/part-0")
    assert (data / "part-0.parquet").read_bytes() == original
