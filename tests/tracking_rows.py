"""What the tracking tests feed raymb.driver.report.tracking: metrics.csv rows, a config and its
flattened form (by hand), a Tracker started with test defaults, and MLflow's environment
undone after each test."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from raymb.driver.report import tracking
from raymb.driver.report.tracking import Tracker
from raymb.storage import Location
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
