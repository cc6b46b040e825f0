"""Experiment tracking (raymb.rundir.tracking) without Ray: synthetic metrics.csv rows in, read
back out.

TensorBoard's event files are read by TensorBoard's own EventAccumulator; MLflow through
MlflowClient from a real `mlflow server` on 127.0.0.1 (one for the module); an object-store
run directory lives on moto's S3 server. Every expected value is taken from the rows fed in,
never from the tracker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from raymb.errors import ConfigError
from raymb.rundir import tracking
from raymb.rundir.storage import Location, resolve
from raymb.rundir.tracking import Tracker, flatten, points
from raymb.worker.metrics import COLUMNS

CONFIG = {
    "run": {"name": "t"},
    "optim": {"lr": 0.05, "betas": [0.9, 0.999]},
    "train": {"epochs": 3, "deterministic": True, "early_stopping": {"patience": None}},
}
FLAT = {  # CONFIG flattened by hand: lists as JSON, unset keys left out
    "run.name": "t",
    "optim.lr": 0.05,
    "optim.betas": "[0.9, 0.999]",
    "train.epochs": 3,
    "train.deterministic": True,
}
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", *tracking.MLFLOW_HTTP_DEFAULTS)


def make_rows(steps, shift: float = 0.0) -> list[dict[str, str]]:
    """metrics.csv rows as the driver reads them: strings, '' where a step has no value
    (validation every 3rd step; no perplexity at all). `shift` moves train_loss, as a rerun
    of the same steps after a resume might."""
    rows = []
    for s in steps:
        val = s % 3 == 0
        values = {
            "step": s,
            "epoch": s // 4,
            "train_loss": 2.0 / s + shift,
            "val_loss": 2.5 / s if val else "",
            "val_accuracy": s / (s + 1) if val else "",
            "val_perplexity": "",
            "val_bits_per_byte": 0.5 + 1 / s if val else "",
            "lr": 0.1 * 0.9**s,
            "samples": 64 * s,
            "samples_per_s": 1234.5 + s,
            "step_time_s": 0.012,
            "data_wait_s": 0.001 * s,
            "bytes_allreduced": 4096 * s,
            "skipped_steps": 0,
        }
        rows.append({k: str(values[k]) for k in COLUMNS})
    return rows


def expected(rows: list[dict[str, str]]) -> dict[str, list[tuple[int, float]]]:
    """column -> [(step, value)] of the rows, for every column but step that has a value."""
    found: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for name in COLUMNS[1:]:
            if row[name]:
                found.setdefault(name, []).append((int(row["step"]), float(row[name])))
    return found


def start(run_dir: Location, **overrides) -> Tracker:
    options = dict(
        run_dir=run_dir,
        run_name="t",
        config=CONFIG,
        tensorboard=False,
        mlflow_uri=None,
        mlflow_experiment="raymb-test",
        resumed=False,
    )
    return Tracker.start(**(options | overrides))


@pytest.fixture(autouse=True)
def mlflow_env() -> Iterator[None]:
    """No MLFLOW_TRACKING_URI from the machine; whatever a test (or Tracker.start) sets of
    MLflow's environment is undone after it."""
    saved = {k: os.environ.pop(k, None) for k in MLFLOW_ENV}
    yield
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- rows and config --------------------------------------------------------------------------


def test_points_keep_numbers_by_step():
    rows = [
        {"step": "3", "train_loss": "0.25", "val_loss": "", "note": "x"},
        {"step": "", "train_loss": "1.0"},  # no step: not a point
        {"step": "4", "train_loss": "nan"},
    ]
    found = points(rows)
    assert [(p.step, p.values.keys()) for p in found] == [(3, {"train_loss"}), (4, {"train_loss"})]
    assert found[0].values["train_loss"] == 0.25
    assert np.isnan(found[1].values["train_loss"])


def test_flatten_config():
    assert flatten(CONFIG) == FLAT


def test_nothing_asked_for_is_a_tracker_that_does_nothing(tmp_path):
    tracker = start(resolve(str(tmp_path / "run")))
    tracker.log_rows(make_rows(range(1, 4)))
    tracker.finish(summary={"steps": 3}, status="FINISHED", files={})
    assert tracker.sinks == [] and not (tmp_path / "run").exists()


# -- TensorBoard ------------------------------------------------------------------------------


def read_events(logdir: Path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def scalars(events) -> dict[str, list[tuple[int, float]]]:
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def as_float32(found: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """What an event file keeps of each value: a float32."""
    return {k: [(s, float(np.float32(v))) for s, v in pairs] for k, pairs in found.items()}


def test_tensorboard_scalars_hparams_and_text(tmp_path):
    plugin_data = pytest.importorskip("tensorboard.plugins.hparams.plugin_data_pb2")
    run_dir = resolve(str(tmp_path / "run"))
    tracker = start(run_dir, tensorboard=True)
    rows = make_rows(range(1, 11))
    tracker.log_rows(rows[:4])
    tracker.log_rows(rows[4:])
    tracker.finish(summary={"steps": 10}, status="FINISHED", files={})

    events = read_events(tmp_path / "run" / "tensorboard")
    assert scalars(events) == as_float32(expected(rows))  # val_perplexity: never a value

    hparams = {
        tag: plugin_data.HParamsPluginData.FromString(content)
        for tag, content in events.PluginTagToContent("hparams").items()
    }
    logged = hparams["_hparams_/session_start_info"].session_start_info.hparams
    assert {k: logged[k].WhichOneof("kind") for k in logged} == {
        "run.name": "string_value",
        "optim.lr": "number_value",
        "optim.betas": "string_value",
        "train.epochs": "number_value",
        "train.deterministic": "bool_value",
    }
    assert logged["optim.lr"].number_value == 0.05
    assert logged["optim.betas"].string_value == "[0.9, 0.999]"
    end = hparams["_hparams_/session_end_info"].session_end_info
    assert end.status == 1  # STATUS_SUCCESS

    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| optim.lr | 0.05 |" in config_text
    summary_text = events.Tensors("summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(summary_text) == {"steps": 10}


def test_tensorboard_resume_logs_each_step_once(tmp_path):
    run_dir = resolve(str(tmp_path / "run"))
    first = start(run_dir, tensorboard=True)
    first.log_rows(make_rows(range(1, 7)))
    first.finish(summary=None, status="KILLED", files={})

    # The resumed run's metrics.csv, truncated to its checkpoint at step 4, comes again
    # from the start; steps 5 and 6 are trained again (train_loss shifted here to tell them
    # apart), then the run goes on. A resume inside the run repeats the rows once more.
    second = start(run_dir, tensorboard=True, resumed=True)
    second.log_rows(make_rows(range(1, 5)))
    second.log_rows(make_rows(range(5, 10), shift=1.0))
    second.log_rows(make_rows(range(1, 10), shift=1.0))
    second.finish(summary=None, status="FINISHED", files={})

    kept = make_rows(range(1, 7)) + make_rows(range(7, 10), shift=1.0)
    logdir = tmp_path / "run" / "tensorboard"
    assert len(list(logdir.iterdir())) == 2  # the resumed run's own event file
    assert scalars(read_events(logdir)) == as_float32(expected(kept))


def test_tensorboard_in_an_object_store(s3, tmp_path, monkeypatch):
    s3.bucket("tracking")
    monkeypatch.setattr(tracking, "UPLOAD_S", 0.0)  # upload at every batch
    monkeypatch.setattr(tracking, "ROLL_BYTES", 1)  # and begin a new event file after each
    run_dir = resolve("s3://tracking/run")
    tracker = start(run_dir, tensorboard=True)
    tracker.log_rows(make_rows(range(1, 4)))
    assert (run_dir / "tensorboard").children()  # uploaded before the run finishes
    tracker.log_rows(make_rows(range(4, 7)))
    tracker.finish(summary=None, status="KILLED", files={})

    resumed = start(run_dir, tensorboard=True, resumed=True)
    assert resumed.sinks[0].last_step == 6  # read from the event files in the bucket
    resumed.log_rows(make_rows(range(1, 9), shift=1.0))
    resumed.finish(summary=None, status="FINISHED", files={})

    local = (run_dir / "tensorboard").fetch(tmp_path)
    assert len(list(local.iterdir())) >= 4  # rolled: a new file after each upload
    kept = make_rows(range(1, 7)) + make_rows(range(7, 9), shift=1.0)
    assert scalars(read_events(local)) == as_float32(expected(kept))


# -- MLflow ----------------------------------------------------------------------------------


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
    # TensorBoard test above (the checkpoint at step 4) are logged once.
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


def test_mlflow_down_warns_and_training_goes_on(tmp_path, capsys):
    pytest.importorskip("mlflow")
    run_dir = resolve(str(tmp_path / "run"))
    started = time.monotonic()
    tracker = start(run_dir, tensorboard=True, mlflow_uri=f"http://127.0.0.1:{free_port()}")
    assert time.monotonic() - started < 60  # retries shortened from MLflow's four minutes
    assert [s.name for s in tracker.sinks] == ["tensorboard"]
    tracker.log_rows(make_rows(range(1, 4)))
    tracker.finish(summary=None, status="FINISHED", files={})
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("raymb: warning: mlflow: ")
    assert warnings[0].endswith("; carrying on without it")


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


def test_mlflow_not_installed_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` finds: nothing
    run_dir = resolve(str(tmp_path / "run"))
    with pytest.raises(ConfigError) as raised:
        start(run_dir, mlflow_uri="http://127.0.0.1:5000")
    assert str(raised.value) == "log.mlflow_uri needs mlflow: pip install 'raymb[mlflow]'"
    os.environ["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:5000"
    with pytest.raises(ConfigError, match="^MLFLOW_TRACKING_URI is set"):
        start(run_dir)
    assert start(run_dir, mlflow_uri="").sinks == []  # "" turns MLflow off, whatever is set
