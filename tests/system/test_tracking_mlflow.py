"""Experiment tracking (raymb.driver.report.tracking) to MLflow: a real `mlflow server` on 127.0.0.1
(one for the module, sqlite and its own artifact store), read back through MlflowClient. Every
expected value is taken from the rows fed in, never from the tracker. The rest of tracking,
without a server: tests/unit/driver/test_tracking.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from tracking_rows import (
    FLAT,
    expected,
    free_port,
    make_rows,
    mlflow_env,  # noqa: F401 (autouse: MLflow's environment undone)
    start,
)

from raymb.storage import resolve


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """A real MLflow tracking server on 127.0.0.1 (sqlite, artifacts served by it); its URL."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)),
        *("--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
        *("--artifacts-destination", str(root / "artifacts")),
    ]
    log = open(root / "server.log", "wb")
    # No job runner (a third process importing mlflow) and no telemetry: a faster start.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    # A session of its own: the server runs uvicorn as a child, stopped with it.
    proc = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # minutes on a busy machine: it imports a lot, twice
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (root / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"mlflow server did not start:\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in run.data.metrics
    }


def saved_run_id(tmp_path: Path) -> str:
    return json.loads((tmp_path / "run" / "mlflow.json").read_text())["run_id"]


def test_mlflow_params_metrics_artifacts(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = resolve(str(tmp_path / "run"))
    tracker = start(run_dir, mlflow_uri=mlflow_server)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # set when not given
    rows = make_rows(range(1, 11))
    tracker.log_rows(rows[:5])
    tracker.log_rows(rows[5:])
    summary = {"train_loss": 0.2, "steps": 10, "wall_s": 1.5, "stopped_early": False}
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.pt").write_bytes(b"weights")
    files = {
        "summary.json": run_dir / "summary.json",
        "model.pt": resolve(str(tmp_path / "ckpt/model.pt")),
    }
    tracker.finish(summary=summary, status="FINISHED", files=files)

    client = MlflowClient(mlflow_server)
    run_id = saved_run_id(tmp_path)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "raymb-test"
    assert run.data.tags["mlflow.runName"] == "t"
    assert run.data.tags["raymb.run_dir"] == str(tmp_path / "run")
    assert run.data.params == {k: str(v) for k, v in FLAT.items()}
    found = history(client, run_id)
    summaries = {k: found.pop(k) for k in list(found) if k.startswith("summary.")}
    assert found == expected(rows)
    assert summaries == {  # the numbers of the summary, at the last step (a bool is no number)
        "summary.train_loss": [(10, 0.2)],
        "summary.steps": [(10, 10.0)],
        "summary.wall_s": [(10, 1.5)],
    }
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["model.pt", "summary.json"]
    model = Path(client.download_artifacts(run_id, "model.pt", str(tmp_path)))
    assert model.read_bytes() == b"weights"


def test_mlflow_resume_continues_the_run(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = resolve(str(tmp_path / "run"))
    first = start(run_dir, mlflow_uri=mlflow_server)
    first.log_rows(make_rows(range(1, 7)))
    first.finish(summary=None, status="KILLED", files={})
    run_id = saved_run_id(tmp_path)

    # Started again, through MLFLOW_TRACKING_URI this time: steps repeated as in the
    # TensorBoard resume test of tests/unit/driver/test_tracking.py (the checkpoint at step 4) are
    # logged once.
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    second = start(run_dir, resumed=True)
    assert saved_run_id(tmp_path) == run_id
    second.log_rows(make_rows(range(1, 5)))
    second.log_rows(make_rows(range(5, 10), shift=1.0))
    second.finish(summary=None, status="FINISHED", files={})

    client = MlflowClient(mlflow_server)
    assert client.get_run(run_id).info.status == "FINISHED"
    kept = make_rows(range(1, 7)) + make_rows(range(7, 10), shift=1.0)
    assert history(client, run_id) == expected(kept)

    # Not resumed (a new run by the same name): a new MLflow run.
    third = start(run_dir, mlflow_uri=mlflow_server)
    third.finish(summary=None, status="FINISHED", files={})
    assert saved_run_id(tmp_path) != run_id


def test_mlflow_lost_during_the_run_warns_once(mlflow_server, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    tracker = start(resolve(str(tmp_path / "run")), mlflow_uri=mlflow_server)
    tracker.log_rows(make_rows(range(1, 3)))
    tracker.sinks[0].client = MlflowClient(f"http://127.0.0.1:{free_port()}")  # server gone
    tracker.log_rows(make_rows(range(3, 5)))
    tracker.log_rows(make_rows(range(5, 7)))
    tracker.finish(summary={"steps": 6}, status="FINISHED", files={})
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("raymb: warning: mlflow: ")
    assert tracker.sinks == []
