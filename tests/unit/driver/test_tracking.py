"""Experiment tracking (raymb.driver.report.tracking) without Ray: synthetic metrics.csv rows
in, read back out.

TensorBoard's event files are read by TensorBoard's own EventAccumulator; an object-store run
directory lives on moto's S3 server; MLflow without a server here (one down, one lost, none
installed); through a real `mlflow server`: tests/system/test_tracking_mlflow.py. Every
expected value is taken from the rows fed in, never from the tracker.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tracking_rows import (
    CONFIG,
    FLAT,
    expected,
    free_port,
    make_rows,
    mlflow_env,  # noqa: F401 (autouse: MLflow's environment undone)
    start,
)

from raymb.driver.report import tensorboard
from raymb.driver.report.tracking import flatten, points
from raymb.errors import ConfigError
from raymb.storage import resolve

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
    monkeypatch.setattr(tensorboard, "UPLOAD_S", 0.0)  # upload at every batch
    monkeypatch.setattr(tensorboard, "ROLL_BYTES", 1)  # and begin a new event file after each
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


def test_metrics_csv_in_an_object_store_leaves_no_local_copy(s3):
    # The worker appends to a local copy (a store cannot append) and uploads it; closed when
    # the loop ends, the copy and its folder are gone and the bucket holds every row.
    from raymb.worker.metrics import COLUMNS, MetricsCsv

    s3.bucket("metrics")
    target = resolve("s3://metrics/run/metrics.csv")
    rows = MetricsCsv(target)
    rows.append([{"step": 1, "train_loss": 0.5}, {"step": 2, "train_loss": 0.25}])
    rows.flush()
    local = rows.path
    assert local.exists() and local.parent.name.startswith("raymb-metrics-")
    rows.close()
    assert not local.parent.exists()
    lines = target.read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS)
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2"]


# -- MLflow without a server ----------------------------------------------------------------


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
