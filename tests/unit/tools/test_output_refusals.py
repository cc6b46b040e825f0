"""Nothing lost, nothing hung (issue 34): what eval, predict, export, sample, plot and
prepare read and write.

- No command writes over an existing file unless asked (`--force`), nor anything but a
  regular file: a device node, a FIFO or a socket given as --out is left as it was.
- No output is, holds or lies inside one of the command's inputs (the checkpoint's folder,
  the data, a run folder, prepare's sources), however the path is spelled.
- An input that is no regular file (a FIFO, /dev/zero) is refused before it is opened: none
  hangs, none is read without end; a checkpoint file is read with a bound.
- sample's --tokens and --temperature are bounded.
- Each refusal is one line, exit 2, nothing written, under 2 s: the checks come before torch
  (and onnxruntime, whose import leaves $TMPDIR/.ses) is imported.

The device nodes are made in the test's own folder (1,3 is /dev/null's number, 1,5
/dev/zero's): the real /dev is never touched. Making them needs root, as in CI.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_refused, tree

from raymb import Config
from raymb.cli import main
from raymb.errors import RaymbError
from raymb.rundir.checkpoint import MODEL_FILE, STATE_FILE, atomic_save, model_payload

ROOT = Path(__file__).resolve().parents[3]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
METRICS = "step,train_loss,val_loss,samples_per_s\n1,1.0,,10\n2,0.5,0.6,10\n"


def _layout(tmp: Path) -> None:
    """tmp/data/part-0.parquet (a regressor's data), tmp/ckpt/{model.pt,state.pt},
    tmp/run/metrics.csv, tmp/text/a.txt, tmp/images/cat/a.png, tmp/my.toml, tmp/old.png,
    and, as root, tmp/null (a character device 1,3), tmp/zero (1,5); tmp/fifo and
    tmp/fifo.parquet (FIFOs); tmp/holey/ (a data folder holding a FIFO) and tmp/tmp/."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 2)).astype(np.float32)
    features = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 2)
    table = pa.table({"features": features, "label": x.sum(axis=1)})
    (tmp / "data").mkdir()
    pq.write_table(table, tmp / "data" / "part-0.parquet")
    config = Config.from_dict(
        {"data": {"features": "features", "label": "label"}, "model": {"name": "linear"}}
    )
    model = torch.nn.Linear(2, 1)
    (tmp / "ckpt").mkdir()
    atomic_save(model_payload(model, config.to_dict(), 2, 1, False), tmp / "ckpt" / MODEL_FILE)
    (tmp / "ckpt" / STATE_FILE).write_bytes(b"the optimizer's state")
    (tmp / "run").mkdir()
    (tmp / "run" / "metrics.csv").write_text(METRICS)
    (tmp / "text").mkdir()
    (tmp / "text" / "a.txt").write_text("hello world, " * 20)
    (tmp / "images" / "cat").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp / "images" / "cat" / "a.png")
    (tmp / "my.toml").write_text('[model]\nname = "linear"\n')
    (tmp / "old.png").write_bytes(b"an older picture")
    os.mkfifo(tmp / "fifo")
    os.mkfifo(tmp / "fifo.parquet")
    (tmp / "holey").mkdir()
    pq.write_table(table, tmp / "holey" / "part-0.parquet")
    os.mkfifo(tmp / "holey" / "part-1.parquet")
    (tmp / "tmp").mkdir()
    if IS_ROOT:
        os.mknod(tmp / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(tmp / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))


PREDICT = ["predict", "--checkpoint", "ckpt", "--data", "data"]
EXPORT = ["export", "--checkpoint", "ckpt", "--format", "torchscript"]
SAMPLE = ["sample", "--checkpoint", "ckpt", "--prompt", "hi"]

BATTERY = {
    # name: (argv, words in the line, needs root for the device nodes)
    "predict-out-a-device": ([*PREDICT, "--out", "null"], ["--out", "character device"], True),
    "predict-out-a-device-forced": (
        [*PREDICT, "--out", "null", "--force"],
        ["--out", "character device"],
        True,
    ),
    "predict-out-a-fifo": ([*PREDICT, "--out", "fifo", "--force"], ["--out", "a FIFO"], False),
    "predict-out-an-existing-file": (
        [*PREDICT, "--out", "my.toml"],
        ["--out: my.toml exists", "--force"],
        False,
    ),
    "predict-out-a-folder": ([*PREDICT, "--out", "run"], ["--out: run is a directory"], False),
    "predict-out-the-state-beside-model-pt": (
        ["predict", "--checkpoint", "ckpt/model.pt", "--data", "data"]
        + ["--out", "ckpt/state.pt", "--force"],
        ["--out: ckpt/state.pt is inside the input ckpt (--checkpoint)"],
        False,
    ),
    "predict-out-in-the-checkpoint-spelled-with-dots": (
        [*PREDICT, "--out", "data/../ckpt/./p.parquet"],
        ["is inside the input", "(--checkpoint)"],
        False,
    ),
    "predict-out-inside-the-data": (
        [*PREDICT, "--out", "data/p.parquet"],
        ["is inside the input data (--data)"],
        False,
    ),
    "predict-data-a-fifo": (
        ["predict", "--checkpoint", "ckpt", "--data", "fifo.parquet", "--out", "p.parquet"],
        ["fifo.parquet: is a FIFO"],
        False,
    ),
    "predict-data-a-device": (
        ["predict", "--checkpoint", "ckpt", "--data", "zero", "--out", "p.parquet"],
        ["--data", "zero: is a character device"],
        True,
    ),
    "eval-data-a-fifo": (
        ["eval", "--checkpoint", "ckpt", "--data", "fifo.parquet"],
        ["--data", "fifo.parquet: is a FIFO"],
        False,
    ),
    "eval-data-a-folder-holding-a-fifo": (
        ["eval", "--checkpoint", "ckpt", "--data", "holey"],
        ["--data", "holey/part-1.parquet: is a FIFO"],
        False,
    ),
    "eval-data-a-glob-matching-a-fifo": (
        ["eval", "--checkpoint", "ckpt", "--data", "holey/*.parquet"],
        ["--data", "holey/part-1.parquet: is a FIFO"],
        False,
    ),
    "eval-checkpoint-a-fifo": (
        ["eval", "--checkpoint", "fifo", "--data", "data"],
        ["fifo: is a FIFO, not a checkpoint file"],
        False,
    ),
    "export-checkpoint-dev-zero": (
        ["export", "--checkpoint", "zero", "--format", "torchscript", "--out", "m.pt"],
        ["zero: is a character device, not a checkpoint file"],
        True,
    ),
    "export-checkpoint-a-fifo": (
        ["export", "--checkpoint", "fifo", "--format", "onnx", "--out", "m.onnx"],
        ["fifo: is a FIFO"],
        False,
    ),
    "sample-checkpoint-dev-zero": (
        ["sample", "--checkpoint", "zero", "--prompt", "hi", "--tokens", "3"],
        ["zero: is a character device"],
        True,
    ),
    "export-out-a-device": ([*EXPORT, "--out", "null"], ["--out", "character device"], True),
    "export-out-a-fifo": ([*EXPORT, "--out", "fifo"], ["--out", "a FIFO"], False),
    "export-out-an-existing-file": (
        [*EXPORT, "--out", "my.toml"],
        ["--out: my.toml exists", "--force"],
        False,
    ),
    "export-out-beside-model-pt": (
        ["export", "--checkpoint", "ckpt/model.pt", "--format", "torchscript"]
        + ["--out", "ckpt/model.ts"],
        ["--out: ckpt/model.ts is inside the input ckpt (--checkpoint)"],
        False,
    ),
    "export-onnx-refused": (
        ["export", "--checkpoint", "ckpt", "--format", "onnx", "--out", "my.toml"],
        ["--out: my.toml exists"],
        False,
    ),
    "plot-out-the-runs-metrics": (
        ["plot", "run", "--out", "run/metrics.csv", "--force"],
        ["--out: run/metrics.csv is inside the input run (RUN_DIR)"],
        False,
    ),
    "plot-out-inside-the-run": (
        ["plot", "run", "--out", "run/cmp.png"],
        ["is inside the input run"],
        False,
    ),
    "plot-out-an-existing-file": (
        ["plot", "run", "--out", "old.png"],
        ["--out: old.png exists", "--force"],
        False,
    ),
    "plot-out-a-device": (["plot", "run", "--out", "null"], ["character device"], True),
    "prepare-text-out-inside-its-input": (
        ["prepare", "text", "text", "--block-size", "4", "--out", "text/sub"],
        ["--out: text/sub is inside the input text"],
        False,
    ),
    "prepare-text-out-holds-its-input": (
        ["prepare", "text", "text/a.txt", "--block-size", "4", "--out", "."],
        ["holds the input text/a.txt"],
        False,
    ),
    "prepare-images-out-inside-its-root": (
        ["prepare", "images", "images", "--out", "images/x"],
        ["--out: images/x is inside the input images"],
        False,
    ),
    "prepare-text-input-a-fifo": (
        ["prepare", "text", "fifo", "--block-size", "4", "--out", "new"],
        ["fifo: is a FIFO"],
        False,
    ),
    "sample-tokens-unbounded": (
        [*SAMPLE, "--tokens", "1000000000000"],
        ["--tokens 1000000000000", "100000"],
        False,
    ),
    "sample-tokens-zero": ([*SAMPLE, "--tokens", "0"], ["--tokens 0"], False),
    "sample-top-k-zero": ([*SAMPLE, "--tokens", "3", "--top-k", "0"], ["--top-k 0"], False),
    "sample-seed-past-torch": (
        [*SAMPLE, "--tokens", "3", "--seed", str(2**64)],
        [f"--seed {2**64}: expected 0 to {2**64 - 1}"],
        False,
    ),
    "sample-empty-prompt": (
        ["sample", "--checkpoint", "ckpt", "--prompt", "", "--tokens", "3"],
        ["--prompt: empty"],
        False,
    ),
    "sample-temperature-nan": (
        [*SAMPLE, "--tokens", "3", "--temperature", "nan"],
        ["--temperature nan", "finite"],
        False,
    ),
    "sample-temperature-inf": (
        [*SAMPLE, "--tokens", "3", "--temperature", "inf"],
        ["--temperature inf", "finite"],
        False,
    ),
    "sample-temperature-negative": (
        [*SAMPLE, "--tokens", "3", "--temperature", "-1"],
        ["--temperature -1"],
        False,
    ),
}


@pytest.mark.parametrize("case", sorted(BATTERY))
def test_refused_in_one_line_with_nothing_written_or_lost(tmp_path, case):
    argv, words, needs_root = BATTERY[case]
    if needs_root and not IS_ROOT:
        pytest.skip("making a device node needs root")
    _layout(tmp_path)
    # onnxruntime's import writes $TMPDIR/.ses: a folder under the test's, which must not change
    assert_refused(argv, tmp_path, *words, env={"TMPDIR": str(tmp_path / "tmp")})
    assert (tmp_path / "ckpt" / STATE_FILE).read_bytes() == b"the optimizer's state"
    assert (tmp_path / "run" / "metrics.csv").read_text() == METRICS
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    if IS_ROOT:
        for name, minor in (("null", 3), ("zero", 5)):
            st = os.lstat(tmp_path / name)
            assert stat.S_ISCHR(st.st_mode) and os.minor(st.st_rdev) == minor


REFUSALS_BEFORE_TORCH = {
    "eval": ["eval", "--checkpoint", "ckpt", "--data", "fifo.parquet"],
    "predict": [*PREDICT, "--out", "my.toml"],
    "export": ["export", "--checkpoint", "ckpt", "--format", "onnx", "--out", "my.toml"],
    "sample": [*SAMPLE, "--tokens", "3", "--temperature", "nan"],
    "checkpoint-a-fifo": ["export", "--checkpoint", "fifo", "--format", "onnx", "--out", "m"],
}


@pytest.mark.parametrize("case", sorted(REFUSALS_BEFORE_TORCH))
def test_refusals_come_before_torch_and_onnxruntime_are_imported(tmp_path, case):
    _layout(tmp_path)
    code = (
        "import json, sys\n"
        "from raymb.cli.main import main\n"
        f"rc = main({REFUSALS_BEFORE_TORCH[case]!r})\n"
        "print(json.dumps([rc, sorted(m for m in ('torch', 'onnxruntime', 'onnx') "
        "if m in sys.modules)]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path / "tmp")}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert json.loads(proc.stdout.splitlines()[-1]) == [2, []], proc.stderr
    assert os.listdir(tmp_path / "tmp") == []


def test_force_replaces_a_regular_file_and_a_good_path_still_works(tmp_path, capsys, monkeypatch):
    _layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "preds.parquet"
    assert main([*PREDICT, "--out", "preds.parquet"]) == 0  # a new file: no --force needed
    assert pq.read_table(out).num_rows == 16
    out.write_bytes(b"an older file")
    assert main([*PREDICT, "--out", "preds.parquet"]) == 2
    assert out.read_bytes() == b"an older file"
    assert main([*PREDICT, "--out", "preds.parquet", "--force"]) == 0
    assert pq.read_table(out).num_rows == 16

    assert main([*EXPORT, "--out", "my.toml", "--force"]) == 0
    assert (tmp_path / "my.toml").read_bytes().startswith(b"PK")  # a TorchScript archive
    assert main(["plot", "run", "--out", "old.png", "--force"]) == 0
    assert (tmp_path / "old.png").read_bytes().startswith(b"\x89PNG")
    hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert hidden == []  # no temporary file left
    capsys.readouterr()


def test_plot_default_out_is_runs_png_in_the_current_folder(tmp_path, capsys, monkeypatch):
    _layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["plot", "run"]) == 0
    assert (tmp_path / "runs.png").read_bytes().startswith(b"\x89PNG")
    assert capsys.readouterr().out == "raymb: wrote runs.png\n"
    before = tree(tmp_path)
    assert main(["plot", "run"]) == 2  # the second time: a file is there
    assert "runs.png exists; pass --force" in capsys.readouterr().err
    assert main(["plot", "run", "--force"]) == 0
    # plot from inside the run: the default would lie in the run folder
    monkeypatch.chdir(tmp_path / "run")
    assert main(["plot", "."]) == 2
    assert "runs.png is inside the input ." in capsys.readouterr().err
    assert tree(tmp_path).keys() == before.keys()


def test_prepare_writes_beside_its_input(tmp_path, capsys):
    _layout(tmp_path)
    out = tmp_path / "prepared"
    argv = ["prepare", "text", str(tmp_path / "text"), "--block-size", "4", "--out", str(out)]
    assert main(argv) == 0
    assert (out / "raymb-data.json").is_file()
    capsys.readouterr()


def test_a_checkpoint_larger_than_the_bound_is_refused_unread(tmp_path, monkeypatch):
    import raymb.rundir.checkpoint as checkpoint
    from raymb.tools.load import preflight

    _layout(tmp_path)
    model = tmp_path / "ckpt" / MODEL_FILE
    checkpoint.read(model)  # within the bound
    monkeypatch.setattr(checkpoint, "MAX_CHECKPOINT_BYTES", model.stat().st_size - 1)
    for call in (checkpoint.read, preflight):
        with pytest.raises(RaymbError, match="larger than .* the most a checkpoint file may"):
            call(model)


def test_check_output_and_check_apart_however_spelled(tmp_path):
    from raymb.files import OutputError, check_apart, check_output

    _layout(tmp_path)
    data = tmp_path / "data"
    os.link(data / "part-0.parquet", tmp_path / "hard.parquet")
    # a hard link to a file below an input folder is that file
    with pytest.raises(OutputError, match="is the input"):
        check_apart(tmp_path / "hard.parquet", "--out", [(data, "--data")])
    with pytest.raises(OutputError, match="holds the input"):
        check_apart(tmp_path, "--out", [data])
    assert check_apart(tmp_path / "new.parquet", "--out", [data]) == tmp_path / "new.parquet"
    # a link in the data folder to a file elsewhere: the rename would replace the link there
    (data / "link.parquet").symlink_to(tmp_path / "my.toml")
    with pytest.raises(OutputError, match="is inside the input"):
        check_apart(data / "link.parquet", "--out", [data])
    # and a link elsewhere to a file of the data is that file
    (tmp_path / "elsewhere.parquet").symlink_to(data / "part-0.parquet")
    with pytest.raises(OutputError, match="is the input"):
        check_apart(tmp_path / "elsewhere.parquet", "--out", [data / "part-0.parquet"])
    # an output under a file cannot be made
    with pytest.raises(OutputError, match="lies under .*my.toml, a regular file"):
        check_output(tmp_path / "my.toml" / "x.png", "--out")
