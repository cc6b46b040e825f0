"""What a sweep's trials come to, read from Tune's results and their run directories: each
trial's row of trials.csv (raymb.rundir.sweep writes them), and the summary of a run that had
trained to its end before the sweep was stopped. No Ray: a result is read by its attributes
(config, metrics, path, error), as raymb.driver.tune hands it over.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raymb.config import Config
from raymb.config.tune import Sweep
from raymb.errors import RaymbError
from raymb.rundir import sweep as out
from raymb.rundir.lock import lock_run
from raymb.rundir.runs import STATUS_FILE, mark
from raymb.storage import Location, resolve


def summary_if_finished(run_dir: Path) -> dict[str, Any] | None:
    """A run (a trial's, or a fold's) that trained to its end before the sweep was stopped
    (raymb.rundir.sweep.finished_summary): its summary, without training. A run killed
    between its summary.json and its last mark is marked here, as its driver would have."""
    summary = out.finished_summary(run_dir)
    if summary is not None and _run_status(run_dir) == "running":
        status = out.STOPPED_EARLY if summary.get("stopped_early") else out.FINISHED
        try:
            lock = lock_run(location(run_dir))  # the dead driver's lock is taken over
        except RaymbError:
            return summary  # another driver holds it: its status is its own
        try:
            mark(lock.run_dir, status)
        finally:
            lock.release()
    return summary


def final_metrics(summary: dict[str, Any], config: Config) -> dict[str, Any]:
    """What the last report of a finished run said, from its summary.json."""
    keep = ("train_loss", *(k for k in summary if k.startswith("val_")))  # yours: val_<name>
    return {
        **{k: summary[k] for k in keep if summary.get(k) is not None},
        "step": summary.get("steps"),
        "epoch": config.train.epochs,
    }


def trial_row(
    sweep: Sweep, result, sweep_dir: Path, *, interrupted: bool = False
) -> dict[str, Any]:
    """A trial's row of trials.csv, from Tune's result and its run directory's status.
    `interrupted`: the trial was running or waiting when the sweep was interrupted."""
    config = result.config or {}
    metrics = result.metrics or {}
    name = name_of(result)
    run_dir = sweep_dir / out.TRIALS_DIR / name
    row: dict[str, Any] = {"trial": name, **{k: config.get(k) for k in sweep.keys}}
    row[sweep.metric] = metrics.get(sweep.metric)
    if sweep.tune.cv_folds:
        row[f"{sweep.metric}_std"] = metrics.get(f"{sweep.metric}_std")
        done = metrics.get("fold") == sweep.tune.cv_folds
        stopped = _stopped(run_dir) if interrupted else out.STOPPED_EARLY
        row["status"] = out.FINISHED if done else _failed(result) or stopped
    elif interrupted and not _failed(result) and out.finished_summary(run_dir) is None:
        row["status"] = _stopped(run_dir)
        if _run_status(run_dir) == "running":  # its actor was ended: say so to raymb runs
            mark(location(run_dir), "interrupted")
    else:
        status = _run_status(run_dir)
        error = _failed(result)
        # The scheduler may end a trial's actor at its last report, all its steps trained.
        max_steps = sweep.config.train.max_steps
        trained = (metrics.get("epoch") or 0) >= sweep.config.train.epochs or (
            max_steps is not None and (metrics.get("step") or 0) >= max_steps
        )
        if error:
            row["status"] = error
        elif status == out.FINISHED or (status == "running" and trained):
            row["status"] = out.FINISHED
        else:  # stopped by the scheduler (or by raymb's own early stopping)
            row["status"] = out.STOPPED_EARLY
        if status == "running" and not error:  # its actor was ended: say so to raymb runs
            mark(location(run_dir), row["status"])
    row["steps"] = metrics.get("step")
    row["run_dir"] = str(run_dir)
    return row


def name_of(result) -> str:
    """The trial's name, from its directory (tune-<name>, raymb.driver.tune._tune_config)."""
    path = Path(result.path).name
    return path[len("tune-") :] if path.startswith("tune-") else path


def location(path: Path) -> Location:
    return resolve(str(path))


def _stopped(run_dir: Path) -> str:
    """An interrupted sweep's status for a trial it did not let finish."""
    return out.INTERRUPTED if run_dir.exists() else out.NOT_STARTED


def _failed(result) -> str | None:
    if result.error is None:
        return None
    lines = [line for line in str(result.error).splitlines() if line.strip()]
    return f"failed: {lines[-1].strip() if lines else type(result.error).__name__}"


def _run_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / STATUS_FILE).read_text()).get("status")
    except (OSError, ValueError):
        return None
