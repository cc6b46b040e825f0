"""Inspecting runs without Ray: the progress line, the result table, loss.png and `raymb plot`,
`raymb eval` and `raymb predict`.

Run directories and checkpoints are built by hand here (a metrics.csv written row by row, a
model.pt saved with raymb.rundir.checkpoint), and every number is checked against a computation in
the test (numpy on the model's weights), never against the code under test.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raymb import Config
from raymb.cli import main
from raymb.driver.report.progress import watch
from raymb.driver.report.summary import format_summary
from raymb.driver.report.tail import Tail
from raymb.rundir.checkpoint import MODEL_FILE, atomic_save, model_payload
from raymb.worker.metrics import COLUMNS

pytestmark = pytest.mark.timeout(60)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- helpers


def metric_row(step: int, val: bool = False) -> dict:
    return {
        "step": step,
        "epoch": step // 10,
        "train_loss": 1.0 / step,
        "val_loss": 1.1 / step if val else "",
        "val_accuracy": 0.5 + step / 1000 if val else "",
        "lr": 0.01,
        "samples": step * 64,
        "samples_per_s": 1000.0 + step,
        "step_time_s": 0.01,
        "data_wait_s": 0.001,
        "bytes_allreduced": step * 128,
    }


def append_rows(path: Path, rows: list[dict]) -> None:
    """As raymb.worker.metrics.MetricsCsv: csv.DictWriter, header on first write."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def make_run(root: Path, name: str, steps: int = 30, scale: float = 1.0) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    rows = [metric_row(s, val=s % 10 == 0) for s in range(1, steps + 1)]
    for r in rows:
        r["train_loss"] = scale / r["step"]
    append_rows(run_dir / "metrics.csv", rows)
    return run_dir


def save_model(
    path: Path, model: torch.nn.Module, *, classify: bool, features, in_features: int
) -> Path:
    """A model.pt as a run writes it (raymb.rundir.checkpoint's payload)."""
    config = Config.from_dict(
        {"data": {"features": features, "label": "label"}, "model": {"name": "linear"}}
    )
    out_features = model.out_features
    path.mkdir(parents=True, exist_ok=True)
    atomic_save(
        model_payload(model, config.to_dict(), in_features, out_features, classify),
        path / MODEL_FILE,
    )
    return path / MODEL_FILE


def seeded_linear(d: int, out: int, seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(d, out)


def write_list_data(directory: Path, x: np.ndarray, y: np.ndarray | None, files: int = 2) -> None:
    """x as one fixed-size list column `features`, plus an `id` column, over `files` files."""
    directory.mkdir(parents=True)
    for i, idx in enumerate(np.array_split(np.arange(len(x)), files)):
        cols = {
            "id": pa.array([f"row{j}" for j in idx]),
            "features": pa.FixedSizeListArray.from_arrays(
                pa.array(x[idx].reshape(-1), pa.float32()), x.shape[1]
            ),
        }
        if y is not None:
            cols["label"] = pa.array(y[idx])
        pq.write_table(pa.table(cols), directory / f"part-{i}.parquet")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str) -> str:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("raymb: error: "), err
    return lines[0]


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# ---------------------------------------------------------------- progress


def test_tail_reads_complete_rows_and_starts_over_when_the_file_is_rewritten(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    tail = Tail(path)
    assert tail.read() == ([], False)  # no file yet
    append_rows(path, [metric_row(s) for s in (1, 2, 3)])
    rows, restarted = tail.read()
    assert [r["step"] for r in rows] == ["1", "2", "3"] and not restarted
    with open(path, "a", newline="") as f:
        f.write("4,0,0.25")  # the writer is mid-row
    assert tail.read() == ([], False)
    with open(path, "a", newline="") as f:
        f.write(",,,0.01,256,1004,0.01,0.001,512\r\n")
    rows, _ = tail.read()
    assert [(r["step"], r["train_loss"], r["val_loss"]) for r in rows] == [("4", "0.25", "")]

    # A resume from step 2: the driver rewrites the file (tmp + rename) without steps 3, 4.
    tmp = tmp_path / "metrics.csv.tmp"
    append_rows(tmp, [metric_row(s) for s in (1, 2)])
    os.replace(tmp, path)
    rows, restarted = tail.read()
    assert restarted and [r["step"] for r in rows] == ["1", "2"]
    append_rows(path, [metric_row(3)])
    rows, restarted = tail.read()
    assert [r["step"] for r in rows] == ["3"] and not restarted


def test_plain_lines_at_most_every_interval_and_a_final_line(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    append_rows(path, [metric_row(s) for s in range(1, 11)])
    stream = io.StringIO()
    with watch(path, 100, stream, interval=0.01, line_every=3600):
        wait_for(lambda: stream.getvalue())  # the rows already there: one line at once
        append_rows(path, [metric_row(s, val=s == 20) for s in range(11, 41)])
        time.sleep(0.1)  # several polls see the new rows; the interval holds the line back
        assert len(stream.getvalue().splitlines()) == 1
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "\r" not in stream.getvalue()
    assert lines[0].startswith("raymb: step 10/100 [##----")
    final = lines[1]
    assert final.startswith("raymb: step 40/100 [########------------]  40%"), final
    assert f"loss {1 / 40:.6g}" in final
    assert f"val_loss {1.1 / 20:.6g}" in final  # the last validation, not an empty column
    assert "val_acc 0.5200" in final
    assert "1,040 samples/s" in final
    # The rows there at the start and one read of new ones time no rate yet: no ETA (the ETA
    # on a fake clock: tests/unit/driver/test_progress.py).
    assert "ETA" not in final


def test_plain_line_for_every_row_when_rows_are_rarer_than_the_interval(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    stream = io.StringIO()
    with watch(path, None, stream, interval=0.01, line_every=0):
        time.sleep(0.05)
        assert stream.getvalue() == ""  # nothing before the first row
        for step in (1, 2, 3):
            append_rows(path, [metric_row(step)])
            wait_for(lambda s=step: f"step {s} " in stream.getvalue())
    lines = stream.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["1", "2", "3"]  # no repeat at exit
    assert all("ETA" not in line and "[" not in line for line in lines)  # total unknown


def test_terminal_bar_redraws_in_place_and_ends_the_line(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    append_rows(path, [metric_row(s) for s in range(1, 6)])
    stream = Terminal()
    with watch(path, 10, stream, interval=0.01):
        wait_for(lambda: "step 5/10" in stream.getvalue())
        append_rows(path, [metric_row(s) for s in range(6, 11)])
        wait_for(lambda: "step 10/10" in stream.getvalue())
    out = stream.getvalue()
    assert out.startswith("\r") and out.endswith("\n") and out.count("\n") == 1
    last = out.rstrip("\n").split("\r")[-1]
    assert last.startswith("step 10/10 [####################] 100%"), last
    assert "raymb:" not in out


def test_a_failing_body_still_ends_the_line_and_raises(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    append_rows(path, [metric_row(1)])
    stream = Terminal()
    with pytest.raises(RuntimeError, match="boom"), watch(path, 10, stream, interval=0.01):
        raise RuntimeError("boom")
    assert stream.getvalue().endswith("\n")
    assert not [t for t in __import__("threading").enumerate() if t.name == "raymb-progress"]


def test_format_summary() -> None:
    summary = {
        "train_loss": 0.0123456789,
        "val_loss": 0.02,
        "val_accuracy": 0.95,
        "steps": 1200,
        "samples": 76800,
        "samples_per_s": 12345.678,
        "wall_s": 83.4,
        "checkpoint": "runs/demo/checkpoint_3/model.pt",
        "resumed_from_steps": [600],
        "bytes_allreduced": 3 * 1024**3 // 2,
    }
    table = format_summary(summary, Path("runs/demo")).splitlines()
    assert table == [
        "train loss    0.0123457",
        "val loss      0.02",
        "val accuracy  0.9500",
        "steps         1,200 (resumed from step 600)",
        "samples       76,800",
        "samples/s     12,345.7",
        "wall time     1m23s",
        "all-reduced   1.5 GiB per worker",
        "checkpoint    runs/demo/checkpoint_3/model.pt",
        "run dir       runs/demo",
    ]
    regression = {**summary, "val_accuracy": None, "resumed_from_steps": [], "wall_s": 2.25}
    text = format_summary(regression, "runs/demo")
    assert "val accuracy  n/a" in text
    assert "steps         1,200\n" in text
    assert "wall time     2.2s" in text
    # keys a newer driver may add: shown when they say something
    stopped = {
        **summary,
        "stopped_early": True,
        "skipped_steps": 2,
        "best_checkpoint": "b/model.pt",
    }
    lines = format_summary(stopped, "runs/demo").splitlines()
    assert "steps         1,200 (resumed from step 600; stopped early; 2 skipped)" in lines
    assert "best          b/model.pt" in lines
    same = {**summary, "stopped_early": False, "best_checkpoint": summary["checkpoint"]}
    assert format_summary(same, "runs/demo") == format_summary(summary, "runs/demo")
    online = {**summary, "files_consumed": 12, "stop_reason": "idle"}
    assert "files         12 (idle)" in format_summary(online, "runs/demo").splitlines()


# ---------------------------------------------------------------- plots


def test_every_run_writes_loss_png(tmp_path) -> None:
    from raymb.driver.report.plot import write_run_plot

    run_dir = make_run(tmp_path, "grad")
    out = write_run_plot(run_dir)
    assert out == run_dir / "loss.png"
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in run_dir.iterdir()) == ["loss.png", "metrics.csv"]  # no tmp
    assert write_run_plot(tmp_path / "no-such-run") is None  # never fails the run


def test_without_matplotlib_nothing_breaks(tmp_path, monkeypatch, capsys) -> None:
    from raymb.driver.report.plot import write_run_plot

    run_dir = make_run(tmp_path, "grad")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert write_run_plot(run_dir) is None
    assert not (run_dir / "loss.png").exists()
    code, _, err = run_cli(capsys, "plot", str(run_dir), "--out", str(tmp_path / "x.png"))
    assert "pip install 'raymb[plot]'" in one_line_error(code, err)


def test_raymb_plot_overlays_runs(tmp_path, capsys, monkeypatch) -> None:
    import raymb.driver.report.plot

    grad = make_run(tmp_path, "grad", steps=30)
    param = make_run(tmp_path, "param", steps=20, scale=2.0)
    drawn = {}
    draw = raymb.driver.report.plot._draw
    monkeypatch.setattr(
        raymb.driver.report.plot,
        "_draw",
        lambda runs, out, title: drawn.update(runs=runs) or draw(runs, out, title=title),
    )
    out = tmp_path / "plots" / "compare.png"
    code, stdout, err = run_cli(capsys, "plot", str(grad), str(param), "--out", str(out))
    assert code == 0, err
    assert stdout == f"raymb: wrote {out}\n"
    assert out.read_bytes().startswith(PNG_MAGIC)
    runs = drawn["runs"]
    assert [r.label for r in runs] == ["grad", "param"]
    assert runs[1].step == list(range(1, 21))
    assert runs[1].train_loss[3] == pytest.approx(2.0 / 4)
    assert runs[0].val_step == [10, 20, 30]  # validation rows only


def test_raymb_plot_errors(tmp_path, capsys) -> None:
    grad = make_run(tmp_path, "grad")
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "plot", str(grad), str(empty), "--out", str(tmp_path / "x.png"))
    assert (
        one_line_error(code, err)
        == f"raymb: error: {empty}: no metrics.csv (is it a run directory?)"
    )
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- eval and predict


def test_eval_classifier_against_numpy(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(257, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=257)
    write_list_data(tmp_path / "val", x, y)
    model = seeded_linear(5, 3, seed=1)
    checkpoint = save_model(
        tmp_path / "ckpt", model, classify=True, features="features", in_features=5
    )

    w, b = model.weight.detach().double().numpy(), model.bias.detach().double().numpy()
    logits = x.astype(np.float64) @ w.T + b
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected_loss = -log_softmax[np.arange(len(y)), y].mean()
    expected_accuracy = (logits.argmax(axis=1) == y).mean()

    # a checkpoint directory, as well as its model.pt
    code, out, err = run_cli(
        capsys, "eval", "--checkpoint", str(checkpoint.parent), "--data", str(tmp_path / "val")
    )
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["rows"] == 257
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(expected_accuracy, abs=1e-12)


def test_eval_regression_against_numpy(tmp_path, capsys) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 3)).astype(np.float32)
    y = rng.normal(size=100).astype(np.float32)
    data = tmp_path / "val.parquet"
    pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "label": y}), data)
    model = seeded_linear(3, 1, seed=2)
    checkpoint = save_model(
        tmp_path / "ckpt", model, classify=False, features=["a", "b", "c"], in_features=3
    )

    w, b = model.weight.detach().double().numpy(), model.bias.detach().double().numpy()
    expected = ((x.astype(np.float64) @ w.T + b)[:, 0] - y) ** 2

    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(checkpoint), "--data", str(data))
    assert code == 0, err
    assert json.loads(out) == {
        "loss": pytest.approx(expected.mean(), rel=1e-5),
        "accuracy": None,
        "rows": 100,
    }


def test_predict_classifier_unlabelled(tmp_path, capsys) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    write_list_data(tmp_path / "new", x, None, files=3)
    model = seeded_linear(4, 3, seed=3)
    checkpoint = save_model(
        tmp_path / "ckpt", model, classify=True, features="features", in_features=4
    )
    out = tmp_path / "preds" / "p.parquet"

    code, stdout, err = run_cli(
        capsys,
        "predict",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(tmp_path / "new"),
        "--out",
        str(out),
    )
    assert code == 0, err
    assert stdout == f"raymb: wrote 50 predictions to {out}\n"
    assert sorted(os.listdir(out.parent)) == ["p.parquet"]  # no temporary file left
    table = pq.read_table(out)
    assert table.column_names == ["id", "prediction", "probabilities"]
    assert table.column("id").to_pylist() == [f"row{i}" for i in range(50)]

    w, b = model.weight.detach().double().numpy(), model.bias.detach().double().numpy()
    logits = x.astype(np.float64) @ w.T + b
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(table.column("prediction").to_numpy(), logits.argmax(axis=1))
    got = np.array(table.column("probabilities").to_pylist())
    np.testing.assert_allclose(got, probabilities, rtol=1e-5, atol=1e-7)


def test_predict_regression_keeps_label_and_replaces_output(tmp_path, capsys) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 2)).astype(np.float32)
    y = rng.normal(size=30).astype(np.float32)
    data = tmp_path / "val.parquet"
    pq.write_table(pa.table({"k": np.arange(30), "a": x[:, 0], "b": x[:, 1], "label": y}), data)
    model = seeded_linear(2, 1, seed=4)
    checkpoint = save_model(
        tmp_path / "ckpt", model, classify=False, features=["a", "b"], in_features=2
    )
    out = tmp_path / "p.parquet"
    out.write_bytes(b"an older file")

    code, _, err = run_cli(
        capsys,
        "predict",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(data),
        "--out",
        str(out),
        "--force",  # the older file is replaced only when asked
    )
    assert code == 0, err
    table = pq.read_table(out)
    assert table.column_names == ["k", "label", "prediction"]
    np.testing.assert_array_equal(table.column("label").to_numpy(), y)
    w, b = model.weight.detach().double().numpy(), model.bias.detach().double().numpy()
    np.testing.assert_allclose(
        table.column("prediction").to_numpy(),
        (x.astype(np.float64) @ w.T + b)[:, 0],
        rtol=1e-5,
        atol=1e-6,
    )


def test_eval_and_predict_errors_are_one_line(tmp_path, capsys) -> None:
    x = np.zeros((8, 4), np.float32)
    write_list_data(tmp_path / "val", x, np.zeros(8, np.int64))
    model = seeded_linear(4, 3, seed=0)
    checkpoint = save_model(
        tmp_path / "ckpt", model, classify=True, features="features", in_features=4
    )
    narrow = seeded_linear(2, 3, seed=0)
    narrow_ckpt = save_model(
        tmp_path / "narrow", narrow, classify=True, features="features", in_features=2
    )
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    val = str(tmp_path / "val")

    cases = [
        (["eval", "--checkpoint", str(garbage), "--data", val], f"{garbage}: not a"),
        (
            ["eval", "--checkpoint", str(tmp_path / "nope"), "--data", val],
            "checkpoint file not found",
        ),
        (
            ["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "nodata")],
            "--data: no such file",
        ),
        (
            ["eval", "--checkpoint", str(narrow_ckpt), "--data", val],
            "has 4 features per row; the model takes 2",
        ),
        (
            [
                "predict",
                "--checkpoint",
                str(narrow_ckpt),
                "--data",
                val,
                "--out",
                str(tmp_path / "p.parquet"),
            ],
            "has 4 features per row; the model takes 2",
        ),
        (
            ["predict", "--checkpoint", str(checkpoint), "--data", val, "--out", str(tmp_path)],
            "is a directory",
        ),
    ]
    for args, message in cases:
        code, _, err = run_cli(capsys, *args)
        assert message in one_line_error(code, err), (args, err)

    pq.write_table(pa.table({"other": [1.0]}), tmp_path / "other.parquet")
    code, _, err = run_cli(
        capsys,
        "predict",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(tmp_path / "other.parquet"),
        "--out",
        str(tmp_path / "p.parquet"),
    )
    assert "no feature column 'features'" in one_line_error(code, err)
    assert not (tmp_path / "p.parquet").exists()


# ---------------------------------------------------------------- raymb train wiring


def test_train_follow_calls_online_follow_and_prints_the_table(
    tmp_path, capsys, monkeypatch
) -> None:
    calls = []
    summary = {
        "train_loss": 0.5,
        "val_loss": None,
        "val_accuracy": None,
        "steps": 7,
        "samples": 7,
        "samples_per_s": 3.5,
        "wall_s": 2.0,
        "checkpoint": None,
        "resumed_from_steps": [],
        "bytes_allreduced": 0,
    }

    def follow(config, directory, *, idle_timeout, address, verbose):
        calls.append((config.run.name, directory, idle_timeout, address))
        live = tmp_path / "runs" / "live"
        return types.SimpleNamespace(run_dir=live, summary=summary, status="finished")

    monkeypatch.setitem(sys.modules, "raymb.driver.run", types.SimpleNamespace(follow=follow))
    code, out, err = run_cli(
        capsys, "train", "--set", "run.name=live", "--follow", str(tmp_path), "--idle-timeout", "5"
    )
    assert code == 0, err
    assert calls == [("live", str(tmp_path), 5.0, None)]
    assert out == "raymb: done\n" + format_summary(summary, tmp_path / "runs" / "live") + "\n"

    code, _, err = run_cli(capsys, "train", "--follow", str(tmp_path))
    assert code == 0 and calls[-1][2] == 60.0  # the default idle timeout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--idle-timeout", "5"], "--idle-timeout needs --follow DIR"),
        (["--follow", "no/such/dir"], "--follow no/such/dir: no such directory"),
        (["--follow", ".", "--idle-timeout", "0"], "--idle-timeout 0: expected a positive number"),
    ],
)
def test_train_follow_errors(capsys, args, message) -> None:
    code, _, err = run_cli(capsys, "train", *args)
    assert one_line_error(code, err) == f"raymb: error: {message}"


@pytest.mark.parametrize("command", ["train", "eval", "predict", "plot"])
def test_every_flag_has_help(command, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    flags = {
        "train": ["--follow DIR", "--idle-timeout SECONDS", "(default 60)"],
        "eval": ["--checkpoint PATH", "--data PATH"],
        "predict": ["--checkpoint PATH", "--data PATH", "--out FILE"],
        "plot": ["RUN_DIR", "--out FILE", "(default runs.png)"],
    }[command]
    for flag in flags:
        assert flag in text, (flag, text)
