"""`raymb runs`: run directories written by hand, file by file, as the driver and Ray Train
write them, listed locally and from an S3 server; no Ray."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import pytest

from raymb import storage
from raymb.cli import main
from raymb.rundir import runs
from raymb.storage import Location

COLUMNS = "step,epoch,train_loss,val_loss,val_accuracy,lr,samples,samples_per_s"
DAY = 86400.0
T0 = time.time() - 3 * DAY  # the listing's runs were last written 3, 2 and 1 days ago


def write_run(
    run_dir: Location,
    *,
    metric: str = "val_loss",
    rows: Sequence[tuple] = (),
    summary: dict | None = None,
    status: dict | None = None,
    kept: Sequence[tuple[str, dict]] = (),
    latest: tuple[str, dict] | None = None,
    checkpoints: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """The files of a run directory. rows: (step, epoch, train_loss, val_loss, val_accuracy);
    kept: Ray Train's retained checkpoints (dir name, reported metrics); checkpoints: dir name
    -> the files in it."""
    config = {"run": {"name": run_dir.name}, "checkpoint": {"metric": metric, "keep": 2}}
    (run_dir / "run.json").write_text(json.dumps({"format": "raymb", "config": config}))
    if rows:
        lines = [COLUMNS] + [
            ",".join("" if v is None else str(v) for v in row) + ",0.05,64,1000.0" for row in rows
        ]
        (run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    if status is not None:
        (run_dir / "status.json").write_text(json.dumps(status))
    if kept or latest:
        results = [{"checkpoint_dir_name": name, "metrics": m} for name, m in kept]
        snapshot = {"checkpoint_results": results, "latest_checkpoint_result": None}
        if latest:
            snapshot["latest_checkpoint_result"] = {
                "checkpoint_dir_name": latest[0],
                "metrics": latest[1],
            }
        (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    for name, files in (checkpoints or {}).items():
        for file in files:
            (run_dir / name / file).write_bytes(b"PK\x03\x04")


def age(run_dir: Location, when: float) -> None:
    """Set the modification time of everything in a local run directory."""
    for parent, dirs, files in os.walk(run_dir.path):
        for name in dirs + files:
            os.utime(os.path.join(parent, name), (when, when))


def dead_pid() -> int:
    """The id of a process that ran on this machine and has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def listing(capsys, *argv: str) -> tuple[int, list[dict], str]:
    code = main(["runs", *argv, "--json"])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


@pytest.fixture
def storage_path(tmp_path) -> Location:
    """Three runs (finished, failed, stopped early), a directory that is not a run, a file."""
    root = storage.resolve(tmp_path / "runs")
    finished = root / "finished"
    write_run(
        finished,
        rows=[(10, 0, 0.9, None, None), (20, 1, 0.5, 0.41, None), (30, 1, 0.4, 0.44, None)],
        summary={"steps": 30, "wall_s": 125.0, "stopped_early": False},
        status={"status": "finished", "updated": T0, "host": "elsewhere", "pid": 1},
        kept=[("checkpoint_b", {"step": 20, "val_loss": 0.41}), ("checkpoint_c", {"step": 30})],
        latest=("checkpoint_c", {"step": 30, "val_loss": None}),
        checkpoints={"checkpoint_b": ("model.pt", "state.pt"), "checkpoint_c": ("model.pt",)},
    )
    age(finished, T0)
    failed = root / "failed"
    write_run(
        failed,
        metric="val_accuracy",
        rows=[(5, 0, 2.0, 1.5, 0.5), (10, 1, 1.0, 1.2, 0.75), (15, 2, 0.8, 1.3, 0.625)],
        status={
            "status": "failed",
            "updated": T0 + DAY,
            "started": T0 + DAY - 3700,
            "host": socket.gethostname(),
            "pid": 1,
            "error": "training failed: CUDA out of memory",
        },
        # No Ray record: the newest directory holding model.pt and state.pt.
        checkpoints={
            "checkpoint_2026-01-01_10-00-00": ("model.pt", "state.pt"),
            "checkpoint_2026-01-01_11-00-00": ("model.pt", "state.pt"),
            "checkpoint_2026-01-01_12-00-00": ("model.pt",),  # still uploading
        },
    )
    age(failed, T0 + DAY)
    older = root / "older"  # from before status.json; no data.val: train_loss is the metric
    write_run(
        older,
        rows=[(8, 0, 0.7, None, None), (16, 1, 0.3, None, None), (24, 2, 0.35, None, None)],
        summary={"steps": 24, "wall_s": 4000.0, "stopped_early": True},
    )
    age(older, T0 + 2 * DAY)
    (root / "notes" / "todo.txt").write_text("not a run")
    (root / "README").write_text("not a run either")
    return root


def test_lists_each_run_with_what_its_files_say(storage_path, capsys):
    code, found, err = listing(capsys, storage_path.uri)
    assert (code, err) == (0, "")
    assert [r["name"] for r in found] == ["finished", "failed", "older"]  # newest last
    finished, failed, older = found

    assert finished["status"] == "finished"
    assert finished["steps"] == 30
    # the best val_loss of the checkpoints Ray kept; the latest one was not validated
    assert (finished["metric"], finished["best"]) == ("val_loss", 0.41)
    assert finished["checkpoint"] == f"{storage_path.uri}/finished/checkpoint_c"
    assert finished["checkpoint_step"] == 30
    assert finished["wall_s"] == 125.0
    assert finished["updated"] == pytest.approx(T0, abs=1e-3)

    assert failed["status"] == "failed"
    assert failed["error"] == "training failed: CUDA out of memory"
    assert failed["steps"] == 15
    assert (failed["metric"], failed["best"]) == ("val_accuracy", 0.75)  # higher is better
    assert failed["checkpoint"].endswith("/failed/checkpoint_2026-01-01_11-00-00")
    assert failed["wall_s"] == pytest.approx(3700, abs=1e-3)  # started to last written

    assert older["status"] == "stopped early"  # no status.json: summary.json says
    assert older["steps"] == 24
    assert (older["metric"], older["best"]) == ("train_loss", 0.3)
    assert older["checkpoint"] is None
    assert older["wall_s"] == 4000.0


def test_the_latest_checkpoint_is_the_newest_whichever_launcher_wrote_it(tmp_path, capsys):
    run_dir = storage.resolve(tmp_path / "mixed")
    ray_dir = "checkpoint_2026-01-01_10-00-00"
    write_run(
        run_dir,
        kept=[(ray_dir, {"step": 30})],
        latest=(ray_dir, {"step": 30}),  # trained on Ray to step 30, then with --local
        checkpoints={
            ray_dir: ("model.pt", "state.pt"),
            "checkpoint_00000040": ("model.pt", "state.pt"),
            "checkpoint_00000050": ("model.pt", "state.pt"),  # being written: no .complete
        },
    )
    (run_dir / "checkpoint_00000040" / ".complete").write_text('{"val_loss": 0.3}')
    _, [run], _ = listing(capsys, run_dir.uri)
    assert (run["checkpoint"], run["checkpoint_step"]) == (f"{run_dir.uri}/checkpoint_00000040", 40)
    # Ray Train trained on from the --local segment's step 40.
    write_run(run_dir, kept=[(ray_dir, {"step": 60})], latest=(ray_dir, {"step": 60}))
    assert runs.latest_checkpoint(run_dir) == (run_dir / ray_dir, 60)


def test_table_has_a_line_per_run(storage_path, capsys):
    assert main(["runs", storage_path.uri]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == "NAME STATUS STEPS BEST LAST CHECKPOINT WALL UPDATED".split()
    assert len(lines) == 3
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(T0))
    assert lines[0].split() == [
        "finished",
        "finished",
        "30",
        "val_loss",
        "0.41",
        "checkpoint_c",
        "2m",
        "05s",
        *when.split(),
    ]
    failed = "failed failed 15 val_accuracy 0.75 checkpoint_2026-01-01_11-00-00".split()
    assert lines[1].split()[:6] == failed
    assert lines[2].split()[:2] == ["older", "stopped"]
    assert "1h 06m" in lines[2]  # 4000 s = 1 h 06 min 40 s
    # one width per column: every STEPS cell ends where the header's does
    end = header.index("STEPS") + len("STEPS")
    assert all(line[end - 1].isdigit() and line[end] == " " for line in lines)


def test_running_and_interrupted(tmp_path, capsys):
    root = storage.resolve(tmp_path)
    here = socket.gethostname()
    live, dead, remote, bare = root / "live", root / "dead", root / "remote", root / "bare"
    write_run(live, rows=[(3, 0, 1.0, None, None)])
    runs.mark(live, "running")  # this process: alive
    write_run(dead, rows=[(7, 0, 1.0, None, None)])
    pid = dead_pid()
    (dead / "status.json").write_text(
        json.dumps({"status": "running", "updated": time.time(), "host": here, "pid": pid})
    )
    # Another machine's driver cannot be checked from here: it stays running.
    write_run(remote)
    (remote / "status.json").write_text(
        json.dumps({"status": "running", "updated": time.time(), "host": f"not-{here}", "pid": pid})
    )
    write_run(bare)  # run.json only: started, never got further
    _, found, _ = listing(capsys, root.uri)
    status = {r["name"]: r["status"] for r in found}
    assert status == {
        "live": "running",
        "dead": "interrupted",
        "remote": "running",
        "bare": "unknown",
    }
    steps = {r["name"]: r["steps"] for r in found}
    assert steps == {"live": 3, "dead": 7, "remote": None, "bare": None}


def test_mark_records_status_host_pid_and_keeps_started(tmp_path):
    run_dir = storage.resolve(tmp_path / "run")
    before = time.time()
    runs.mark(run_dir, "running")
    first = json.loads((run_dir / "status.json").read_text())
    assert first["status"] == "running"
    assert (first["host"], first["pid"]) == (socket.gethostname(), os.getpid())
    assert before - 1e-3 <= first["started"] == first["updated"] <= time.time()
    runs.mark(run_dir, "failed", error="training failed: boom")
    second = json.loads((run_dir / "status.json").read_text())
    assert second["status"] == "failed"
    assert second["error"] == "training failed: boom"
    assert second["started"] == first["started"]
    assert sorted(os.listdir(run_dir.path)) == ["status.json"]  # no temporary file left
    with pytest.raises(ValueError, match="done"):
        runs.mark(run_dir, "done")


def test_storage_path_from_set_and_default(storage_path, tmp_path, monkeypatch, capsys):
    _, found, _ = listing(capsys, "--set", f"run.storage_path={storage_path.uri}")
    assert len(found) == 3
    monkeypatch.chdir(tmp_path)  # the default: ./runs
    _, found, _ = listing(capsys)
    assert [r["location"] for r in found][0] == f"{storage_path.uri}/finished"
    _, found, _ = listing(capsys, f"{storage_path.uri}/older")  # a run directory itself
    assert [r["name"] for r in found] == ["older"]


def test_bad_storage_path_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for path, reason in [(tmp_path / "missing", "no such directory"), (tmp_path / "file", "not a")]:
        assert main(["runs", str(path)]) == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith(f"raymb: error: {path}: {reason}")
        assert err.count("\n") == 1


def test_empty_storage_path_is_a_note(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"raymb: no runs in {tmp_path}\n"
    assert main(["runs", str(tmp_path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert (out, err.count("\n")) == ("", 1)


def test_object_store(s3, capsys):
    s3.bucket("runs-bucket")
    root = storage.resolve("s3://runs-bucket/team/runs")
    run_dir = root / "online"
    write_run(
        run_dir,
        rows=[(4, 0, 0.8, 0.9, None), (8, 1, 0.6, 0.7, None)],
        summary={"steps": 8, "wall_s": 12.5, "stop_reason": "interrupted"},
        kept=[("checkpoint_x", {"step": 8, "val_loss": 0.7})],
        latest=("checkpoint_x", {"step": 8, "val_loss": 0.7}),
        checkpoints={"checkpoint_x": ("model.pt", "state.pt")},
    )
    runs.mark(run_dir, "running")
    runs.mark(run_dir, "stopped")
    (root / "scratch" / "notes.txt").write_text("not a run")
    code, found, err = listing(capsys, "s3://runs-bucket/team/runs")
    assert (code, err) == (0, "")
    (run,) = found
    assert run["name"] == "online"
    assert run["status"] == "stopped"
    assert run["steps"] == 8
    assert (run["metric"], run["best"]) == ("val_loss", 0.7)
    assert run["checkpoint"] == "s3://runs-bucket/team/runs/online/checkpoint_x"
    assert run["wall_s"] == 12.5
    assert run["updated"] == pytest.approx(time.time(), abs=60)

    assert main(["runs", "s3://runs-bucket/elsewhere"]) == 2
    assert capsys.readouterr().err == (
        "raymb: error: s3://runs-bucket/elsewhere: no such directory\n"
    )


def test_unreachable_store_is_one_line_and_exit_2(monkeypatch, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "test")
    assert main(["runs", "s3://bucket/runs"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("raymb: error: s3://bucket/runs: ")
    assert "connect" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (9.94, "9.9s"), (60, "1m 00s"), (3599.6, "1h 00m"), (90061, "1d 01h")],
)
def test_format_duration(seconds, text):
    assert runs.format_duration(seconds) == text


def test_listing_imports_neither_ray_nor_torch(storage_path):
    code = (
        "import sys; from raymb.cli import main; main(['runs', sys.argv[1]]); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, storage_path.uri], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines()[-1] == "[]"
