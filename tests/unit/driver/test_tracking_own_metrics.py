"""metrics.name's val_<metric> columns in experiment tracking, without Ray: TensorBoard's
scalars and HParams metrics (read back with TensorBoard's own EventAccumulator), and MLflow's
metrics (a local file store read back through MlflowClient). Expected values are the rows'."""

from __future__ import annotations

import pytest
from tracking_rows import (
    expected,
    make_rows,
    mlflow_env,  # noqa: F401 (autouse: MLflow's environment undone)
    start,
)

from raymb.storage import resolve


def rows_with_f1(steps) -> list[dict[str, str]]:
    """make_rows' rows with metrics.name's val_f1 column, a value where val_loss has one."""
    rows = make_rows(steps)
    for row in rows:
        row["val_f1"] = str(0.5 + int(row["step"]) / 100) if row["val_loss"] else ""
    return rows


def f1_points(rows) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["val_f1"])) for r in rows if r["val_f1"]]


def test_tensorboard_logs_val_f1_as_a_scalar_and_an_hparams_metric(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    plugin_data = pytest.importorskip("tensorboard.plugins.hparams.plugin_data_pb2")
    import numpy as np

    tracker = start(resolve(str(tmp_path / "run")), tensorboard=True)
    rows = rows_with_f1(range(1, 8))
    tracker.log_rows(rows[:2])  # no validation yet: the column is named, without a value
    tracker.log_rows(rows[2:])
    tracker.finish(summary={"steps": 7}, status="FINISHED", files={})

    events = accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("val_f1")]
    assert got == [(s, float(np.float32(v))) for s, v in f1_points(rows)]
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [
        (s, float(np.float32(v))) for s, v in expected(rows)["val_loss"]
    ]
    content = events.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = plugin_data.HParamsPluginData.FromString(content).experiment
    shown = [m.name.tag for m in experiment.metric_infos]
    assert shown == ["train_loss", "val_loss", "val_accuracy", "val_perplexity"] + [
        "val_bits_per_byte",
        "val_f1",
    ]


def test_mlflow_logs_val_f1_by_step_as_val_loss(tmp_path):
    pytest.importorskip("mlflow")
    import json

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = resolve(str(tmp_path / "run"))
    tracker = start(run_dir, mlflow_uri=uri)
    rows = rows_with_f1(range(1, 8))
    tracker.log_rows(rows)
    tracker.finish(summary=None, status="FINISHED", files={})

    client = MlflowClient(tracking_uri=uri)
    run_id = json.loads((tmp_path / "run" / "mlflow.json").read_text())["run_id"]

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    assert history("val_f1") == f1_points(rows)
    assert history("val_loss") == expected(rows)["val_loss"]
