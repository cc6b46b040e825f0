"""The closing sequence of a run (raymb.driver.run, `raymb train` with or without --local and
`--follow`): what the driver keeps of it once fit() returned or failed.

Tracking (TensorBoard, MLflow) starts as the run does and ends with it. A run that finishes
or stops leaves summary.json (the last metrics, its checkpoints as paths or URIs to give
eval), loss.png, the tracked run's artifacts, and status.json. A run whose workers failed is
marked failed and reported in one line that says what was kept; one whose data the workers
refused says only that, and a new one with nothing kept leaves nothing.

No Ray here: a --local run's closing imports none, and a Ray run's failure is read through
raymb.driver.cluster, imported only then.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, NoReturn

from raymb import storage
from raymb.driver.report import plot
from raymb.driver.report.progress import BUILT_IN_VAL
from raymb.driver.report.tracking import Tracker
from raymb.errors import DataError, RaymbError, StorageError
from raymb.rundir.checkpoint import MODEL_FILE
from raymb.rundir.runs import latest_checkpoint, mark

if TYPE_CHECKING:
    from raymb.config import Config
    from raymb.rundir.lock import RunLock
    from raymb.storage import Location


def start_tracking(config: Config, run_dir: Location, *, resumed: bool) -> Tracker:
    """TensorBoard and MLflow, as [log] asks (maybe neither)."""
    return Tracker.start(
        run_dir=run_dir,
        run_name=config.run.name,
        config=config.to_dict(),
        tensorboard=config.log.tensorboard,
        mlflow_uri=config.log.mlflow_uri,
        mlflow_experiment=config.log.mlflow_experiment,
        resumed=resumed,
    )


def finish_run(run_dir: Location, summary: dict[str, Any], status: str, tracker: Tracker) -> None:
    """summary.json, loss.png, the tracked run's end, and status.json saying `status`; a run
    stopped by Ctrl-C or SIGTERM says how to resume it."""
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot.write_run_plot(run_dir)
    finish_tracking(tracker, summary, run_dir)
    mark(run_dir, status)
    if status == "stopped":
        print(
            f"raymb: stopped at step {summary['steps']} (checkpoint saved); "
            "run the same command to resume",
            flush=True,
        )


def finish_tracking(tracker: Tracker, summary: dict[str, Any], run_dir: Location) -> None:
    """End the tracked run with summary.json and the best model as artifacts."""
    files = {"summary.json": run_dir / "summary.json"}
    if summary.get("best_checkpoint"):
        files[MODEL_FILE] = storage.resolve(summary["best_checkpoint"])
    tracker.finish(summary=summary, status="FINISHED", files=files)


def summarize(result, wall_s: float, config: Config, run_dir: Location) -> dict[str, Any]:
    """summary.json: the last metrics, and the checkpoints as paths or URIs to give eval."""
    m = result.metrics or {}
    final = f"{run_dir.on_same(result.checkpoint.path)}/{MODEL_FILE}" if result.checkpoint else None
    best = _best_checkpoint(result, config, run_dir) or final
    stopped_early = bool(m.get("stopped_early"))
    return {
        "train_loss": m.get("train_loss"),
        "val_loss": m.get("val_loss"),
        "val_accuracy": m.get("val_accuracy"),
        **{k: m[k] for k in ("val_perplexity", "val_bits_per_byte") if k in m},
        **{k: v for k, v in m.items() if k.startswith("val_") and k not in BUILT_IN_VAL},
        "steps": m.get("step", 0),
        "samples": m.get("samples", 0),
        "samples_per_s": m["samples"] / m["train_seconds"] if m.get("train_seconds") else None,
        "wall_s": round(wall_s, 3),
        "checkpoint": best if stopped_early else final,
        "best_checkpoint": best,
        "resumed_from_steps": m.get("resumed_from_steps", []),
        "bytes_allreduced": m.get("bytes_allreduced", 0),
        "skipped_steps": m.get("skipped_steps", 0),
        "workers": m.get("workers"),
        "nodes": m.get("nodes"),
        "stopped_early": stopped_early,
        **_noise_summary(m, config),
    }


def _best_checkpoint(result, config: Config, run_dir: Location) -> str | None:
    scored = [
        (m[config.checkpoint.metric], run_dir.on_same(c.path))
        for c, m in (result.best_checkpoints or [])
        if m.get(config.checkpoint.metric) is not None
    ]
    if not scored:
        return None
    pick = min if config.checkpoint.order == "min" else max
    return f"{pick(scored)[1]}/{MODEL_FILE}"


def _noise_summary(metrics: dict[str, Any], config: Config) -> dict[str, Any]:
    """train.noise_scale: the last estimate, and the G the result table compares it with."""
    if not config.train.noise_scale:
        return {}
    G = config.train.global_batch_size
    return {"grad_noise_scale": metrics.get("grad_noise_scale"), "global_batch_size": G}


def raise_failure(error: BaseException, config: Config, lock: RunLock) -> NoReturn:
    """The workers failed: say it in one line, with what was kept (a new run that bad data
    stopped before any checkpoint leaves nothing)."""
    run_dir = lock.run_dir
    latest, _ = latest_checkpoint(run_dir)  # whichever launcher wrote it
    bad_data, line = _read_failure(error)
    if bad_data is not None:  # found by the workers' first read: nothing to keep
        left = None
        if lock.created and latest is None:
            left = lock.discard()
        else:
            mark_failed(run_dir, bad_data)
        # The data error is the news; a run directory that would not go is a footnote.
        note = f" ({run_dir} is left: {left})" if left else ""
        raise DataError(f"{bad_data}{note}") from None
    kept = (
        f"latest checkpoint: {latest} (run again with run.name={config.run.name!r} to resume)"
        if latest
        else "no checkpoint was written"
    )
    mark_failed(run_dir, line)
    raise RaymbError(f"training failed: {line} ({kept})") from error


def _read_failure(error: BaseException) -> tuple[str | None, str]:
    """What the failed workers raised: the message of a DataError, if one did, and the
    failure's one line. Ray Train's error carries the workers' exceptions
    (raymb.driver.cluster reads them); a --local run's (raymb.driver.launch.WorkerFailed) has
    the failed rank's traceback as its text, or how the rank died."""
    from raymb.driver.launch import WorkerFailed  # no torch, no Ray

    if not isinstance(error, WorkerFailed):
        from raymb.driver.cluster import data_error, failure_line  # Ray has been imported

        return data_error(error), failure_line(error)
    marker = f"{DataError.__name__}: "
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    found = [line for line in lines if marker in line]
    bad_data = found[-1].split(marker, 1)[1].strip() if found else None  # the last one raised
    return bad_data, lines[-1] if lines else type(error).__name__  # the traceback's last line


def mark_failed(run_dir: Location, error: str) -> None:
    """status.json says failed, unless the store is what failed: the error at hand is the news."""
    mark_quietly(run_dir, "failed", error=error)


def mark_quietly(run_dir: Location, status: str, **fields: Any) -> None:
    """mark, but a store that fails is no news beside the error at hand."""
    try:
        mark(run_dir, status, **fields)
    except (StorageError, OSError):
        pass
