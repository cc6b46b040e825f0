"""Experiment tracking on the driver: the rows of metrics.csv, also in TensorBoard and MLflow.

The driver tails metrics.csv and hands each batch of new rows to `Tracker.log_rows`; every
column but `step` that holds a number becomes a metric of that step, under the column's name
(metrics.name's val_<metric> as val_loss).

- TensorBoard (`[log] tensorboard = true`): event files in `<run_dir>/tensorboard/` with the
  scalars, the flattened config as hparams and as a text table, the summary as text. A run
  directory in an object store gets them from a local temporary directory, uploaded at most
  every `UPLOAD_S` seconds and at finish.
- MLflow (`[log] mlflow_uri`, or when that is unset the MLFLOW_TRACKING_URI environment
  variable, as MLflow's own tools do): params
  (the flattened config), metrics by step, the files given to `finish` as artifacts, and the
  run's status. The MLflow run's id is kept in `<run_dir>/mlflow.json`, so a resumed run
  continues it.

A resumed run hands over its rows from the first step again (and a resume inside a run, from
the checkpoint's step). Each sink knows the last step it holds (the event files already
written; the MLflow run's `raymb.last_step` tag) and skips the rows at or below it, so no curve
goes back on itself; new event files are opened, old ones are kept.

Tracking is a side channel and never stops training: a sink that fails (a server down, an
upload refused) prints one line, `raymb: warning: mlflow: ...`, and is dropped for the rest of
the run. The one error raised is MLflow asked for but not installed, at start. MLflow's client
retries a request for about four minutes by default; unless MLFLOW_HTTP_REQUEST_MAX_RETRIES
and MLFLOW_HTTP_REQUEST_TIMEOUT are set, raymb makes that a few seconds, so that a server
that is down delays the start of a run by seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raymb.driver.report.tensorboard import TensorBoard
from raymb.errors import ConfigError
from raymb.storage import Location
from raymb.version import version

LAST_STEP_TAG = "raymb.last_step"
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# HParams has no status for a run stopped by hand: KILLED shows as unknown.


@dataclass(frozen=True)
class Point:
    """One metrics.csv row: its step and the numbers it holds."""

    step: int
    values: dict[str, float]


def points(rows: list[dict[str, str]]) -> list[Point]:
    """The rows as Points; a row without a step is left out, and so is a cell without a number."""
    found = []
    for row in rows:
        try:
            step = int(float(row.get("step") or ""))
        except ValueError:
            continue
        values = {}
        for name, text in row.items():
            if name == "step" or not text:
                continue
            try:
                values[name] = float(text)
            except ValueError:
                continue
        found.append(Point(step, values))
    return found


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """{"optim": {"lr": 0.1}} as {"optim.lr": 0.1}; a list as its JSON text; unset keys left out."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        elif value is not None:
            flat[name] = json.dumps(value, default=str)
    return flat


class Tracker:
    """Where a run's metrics go besides metrics.csv: the sinks asked for (maybe none)."""

    def __init__(self, sinks: list) -> None:
        self.sinks = sinks
        self.lock = threading.Lock()  # log_rows runs on the driver's tail thread, finish not

    @classmethod
    def start(
        cls,
        *,
        run_dir: Location,
        run_name: str,
        config: dict,
        tensorboard: bool,
        mlflow_uri: str | None,
        mlflow_experiment: str,
        resumed: bool,
    ) -> Tracker:
        """Open the sinks asked for; ConfigError when MLflow is asked for but not installed."""
        uri = mlflow_target(mlflow_uri)
        flat = flatten(config)
        sinks = []
        if tensorboard:
            sinks.append(_open("tensorboard", TensorBoard, run_dir, flat, resumed))
        if uri:
            for name, value in MLFLOW_HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
            sinks.append(
                _open("mlflow", MLflow, uri, mlflow_experiment, run_dir, run_name, flat, resumed)
            )
        return cls([s for s in sinks if s is not None])

    def log_rows(self, rows: list[dict[str, str]]) -> None:
        """Log new metrics.csv rows; does its I/O (an MLflow request, an upload) on this thread."""
        new = points(rows)
        columns = tuple(rows[0]) if rows else ()
        with self.lock:
            for sink in list(self.sinks):
                ahead = _after(new, sink.last_step)
                if ahead and self._call(sink, sink.log, ahead, columns):
                    sink.last_step = ahead[-1].step

    def finish(self, *, summary: dict | None, status: str, files: dict[str, Location]) -> None:
        """End the run in every sink: `status` FINISHED, FAILED or KILLED; `files` are uploaded
        to MLflow as artifacts under their keys (e.g. {"summary.json": ..., "model.pt": ...})."""
        with self.lock:
            for sink in list(self.sinks):
                self._call(sink, sink.finish, summary, status, files)
            self.sinks = []

    def _call(self, sink, fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except Exception as e:  # anything a sink raises: tracking must not end the training run
            _warn(sink.name, e)
            self.sinks.remove(sink)
            return False


class MLflow:
    """Params, metrics by step, artifacts and status of one MLflow run, kept in mlflow.json."""

    name = "mlflow"

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_dir: Location,
        run_name: str,
        flat: dict,
        resumed: bool,
    ) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        run = self._saved_run(run_dir / "mlflow.json") if resumed else None
        if run is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (
                found.experiment_id if found else self.client.create_experiment(experiment)
            )
            run = self.client.create_run(
                experiment_id,
                run_name=run_name,
                tags={"raymb.run_dir": str(run_dir), "raymb.version": version()},
            )
            saved = {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run.info.run_id}
            (run_dir / "mlflow.json").write_text(json.dumps(saved, indent=2) + "\n")
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        self.last_step = int(run.data.tags.get(LAST_STEP_TAG, -1))
        # A param cannot change in MLflow: a resumed run keeps those of its first start.
        params = [Param(k, str(v)) for k, v in flat.items() if k not in run.data.params]
        self.client.log_batch(self.run_id, params=params)

    def _saved_run(self, saved: Location):
        """The run mlflow.json names, if the server still has it."""
        from mlflow.exceptions import MlflowException

        try:
            run_id = json.loads(saved.read_text())["run_id"]
        except FileNotFoundError:
            return None
        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return None if run.info.lifecycle_stage == "deleted" else run

    def log(self, new: list[Point], columns: tuple[str, ...] = ()) -> None:
        """`new` points, every number a metric (metrics.name's val_<metric> too); `columns`
        is not needed here."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, p.step) for p in new for k, v in p.values.items()]
        last = RunTag(LAST_STEP_TAG, str(new[-1].step))
        self.client.log_batch(self.run_id, metrics=metrics, tags=[last])

    def finish(self, summary: dict | None, status: str, files: dict[str, Location]) -> None:
        from mlflow.entities import Metric

        if summary:
            now, step = int(time.time() * 1000), max(self.last_step, 0)
            numbers = [
                Metric(f"summary.{k}", float(v), now, step)
                for k, v in summary.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            ]
            self.client.log_batch(self.run_id, metrics=numbers)
        with tempfile.TemporaryDirectory(prefix="raymb-mlflow-") as tmp:
            for name, location in files.items():
                local = _local_file(name, location, Path(tmp))
                folder = str(Path(name).parent)
                self.client.log_artifact(self.run_id, str(local), None if folder == "." else folder)
        self.client.set_terminated(self.run_id, status)


def _open(name: str, sink, *args):
    """A sink, or None (and a warning) when it cannot be opened."""
    try:
        return sink(*args)
    except Exception as e:  # a server down, a directory not writable: train without this sink
        _warn(name, e)
        return None


def _after(new: list[Point], step: int) -> list[Point]:
    """The points past `step`, each past the one before (a restarted file starts over)."""
    ahead = []
    for point in new:
        if point.step > step:
            ahead.append(point)
            step = point.step
    return ahead


def mlflow_target(mlflow_uri: str | None) -> str | None:
    """The MLflow server a run logs to: log.mlflow_uri, else $MLFLOW_TRACKING_URI, else none.
    ConfigError when there is one and mlflow is not installed (the driver asks before it
    writes anything)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") if mlflow_uri is None else mlflow_uri
    if uri:
        _require_mlflow(from_env=mlflow_uri is None)
    return uri or None


def _require_mlflow(*, from_env: bool) -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        if from_env:
            raise ConfigError(
                "MLFLOW_TRACKING_URI is set, and logging to it needs mlflow: "
                "pip install 'raymb[mlflow]' (or unset MLFLOW_TRACKING_URI)"
            ) from None
        raise ConfigError("log.mlflow_uri needs mlflow: pip install 'raymb[mlflow]'") from None


def _warn(name: str, error: BaseException) -> None:
    reason = " ".join(str(error).split()) or type(error).__name__
    if len(reason) > 400:  # an HTML error page, say: its start, and the cause at its end
        reason = f"{reason[:200]} ... {reason[-200:]}"
    print(f"raymb: warning: {name}: {reason}; carrying on without it", file=sys.stderr, flush=True)


def _local_file(name: str, location: Location, tmp: Path) -> Path:
    """A local file whose name is the last part of `name`, holding what `location` holds."""
    target = tmp / name
    if location.local and location.name == target.name:
        return Path(location.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if location.local:
        shutil.copyfile(location.path, target)
    else:
        target.write_bytes(location.read_bytes())
    return target
