"""The driver's run path: `raymb train` and `raymb train --follow DIR` share it.

Both check everything before Ray starts (raymb.driver.preflight: neither Ray nor the worker
modules are imported until the checks pass), hold the run directory's lock (raymb.rundir.lock)
to the end, start or join Ray and build the TorchTrainer (raymb.driver.cluster), then run it
through one closing sequence: progress and tracking while it runs; on failure a one-line error
that says what was kept; at the end summary.json, loss.png, the tracked run's artifacts,
status.json.

The progress display (raymb.driver.report.progress) starts before Ray, showing each phase of the
start-up. The first Ctrl-C or SIGTERM writes <run dir>/STOP: the workers checkpoint at the
next step (after the file in hand with --follow) and return, and the run is marked
`stopped`, saying how to resume; a second abandons it at once, marked `interrupted`.

`raymb train --local` (scale.launcher = "local") is the same path without Ray: the data is
read here and the workers are processes of a torch.distributed group on this machine
(raymb.driver.local, raymb.driver.launch) in place of Ray Train's; the checks, the lock, the
progress, the stop, the closing sequence and the run directory are the same.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from raymb import storage
from raymb.config import Config
from raymb.data.checks import DatasetInfo, describe_shape
from raymb.driver.logs import RayLog, close_log
from raymb.driver.preflight import check_run_dir, prepare, prepare_follow, tokenizer_spec
from raymb.driver.report import plot, progress
from raymb.driver.report.tracking import Tracker
from raymb.driver.signals import StopSignals, in_thread
from raymb.errors import DataError, RaymbError, StorageError
from raymb.rundir.checkpoint import MODEL_FILE, claim_run
from raymb.rundir.lock import RunLock, lock_run
from raymb.rundir.runs import latest_checkpoint, mark
from raymb.storage import Location
from raymb.timeline import enabled as timeline_enabled
from raymb.timeline import stamp

STOP_FILE = "STOP"  # raymb.worker.stopping.STOP_FILE; not imported from there (torch)

if TYPE_CHECKING:
    from raymb.core.plan import Plan
    from raymb.worker.spec import EpochsSpec


@dataclass(frozen=True)
class Result:
    """What a finished run leaves: its directory (local or in an object store) and the
    contents of summary.json."""

    run_dir: Location
    summary: dict[str, Any]
    status: str = "finished"
    """As status.json says: finished, stopped early, or stopped (by Ctrl-C or SIGTERM)."""

    @property
    def checkpoint(self) -> str | None:
        return self.summary["checkpoint"]


def train(
    config: Config,
    *,
    address: str | None = None,
    verbose: bool = False,
    callbacks: Sequence[Any] = (),
    stream: TextIO | None = None,
) -> Result:
    """Train as configured and return the run's summary (also written to summary.json).
    Ray's own lines go to <run dir>/logs/ray.log; `verbose` shows them on the terminal.

    A trial of `raymb tune` (raymb.driver.tune) runs it inside the sweep's Ray session: its
    `callbacks` (Ray Train UserCallbacks) go to the trainer's RunConfig, and `stream` takes
    the progress display instead of stderr."""
    local = config.scale.launcher == "local"
    if local:
        from raymb.driver.local import check_local

        if address is not None:
            raise RaymbError("--local runs without a Ray cluster: leave out --address")
        check_local(config)
    run_dir = check_run_dir(config)  # before the data checks: no torch needed
    plan, train_info, val_info = prepare(config)
    shown = progress.Watch(run_dir / "metrics.csv", plan.total_steps, stream)

    def start(stop_file: Location) -> tuple[Callable, Any]:
        if local:  # the whole set in memory, read here as Ray's cache holds it
            from raymb.driver.local import local_spec

            shown.say(_data_line(config, plan, train_info))
            return None, local_spec(config, (plan, train_info, val_info), run_dir)
        from raymb.driver.cluster import use_cache

        # A fold of cross-validation is an index into the cached rows.
        cached = use_cache(config, [train_info, val_info]) or bool(config.data.folds)
        shown.say(_data_line(config, plan, train_info))
        if cached:
            shown.phase("reading data")  # submitting the read tasks; the workers wait on them
        spec = epochs_spec(config, plan, run_dir, train_info, val_info, cached)
        from raymb.worker.epochs import train_loop  # imported while Ray started and read

        return train_loop, spec

    def close(summary: dict[str, Any], metrics: dict[str, Any], stop_asked: bool) -> str:
        if summary["stopped_early"]:
            return "stopped early"
        # A stop asked for as the last step ended changes nothing: the run finished.
        return "stopped" if stop_asked and summary["steps"] < plan.total_steps else "finished"

    return _launch(
        config,
        run_dir,
        address,
        verbose,
        shown,
        start,
        stops="at the next step",
        close=close,
        callbacks=callbacks,
        local=local,
    )


def _data_line(config: Config, plan: Plan, info: DatasetInfo) -> str:
    shape = describe_shape(info, config.data.features)
    return f"raymb: data.train: {info.num_rows} rows, {shape}, task {plan.inputs['task']}"


def follow(
    config: Config,
    directory: str | Path,
    *,
    idle_timeout: float,
    address: str | None = None,
    verbose: bool = False,
) -> Result:
    """Train on each parquet file as it lands in `directory` until `idle_timeout` seconds pass
    without one, or SIGINT; return the run's summary (also written to summary.json).

    With no complete file in `directory` within `idle_timeout`, nothing starts: DataError.
    """
    if config.scale.launcher == "local":
        raise RaymbError('--follow trains on Ray: leave out --local (scale.launcher = "local")')
    run_dir = check_run_dir(config)  # a second driver is refused before waiting for a file
    config, shape, val_info, location = prepare_follow(config, directory, idle_timeout)
    shown = progress.Watch(run_dir / "metrics.csv", None)

    def start(stop_file: Location) -> tuple[Callable, Any]:
        from raymb.driver.cluster import data_spec
        from raymb.worker.follow import follow_loop
        from raymb.worker.spec import FollowSpec

        if val_info:
            shown.phase("reading data")
        spec = FollowSpec(
            config=config,
            shape=shape,
            run_dir=run_dir,
            val=data_spec(val_info, config, True, "data.val") if val_info else None,
            directory=location,
            idle_timeout=float(idle_timeout),
            poll_s=min(0.5, max(0.05, idle_timeout / 10)),
            stop_file=stop_file,
        )
        return follow_loop, spec

    def close(summary: dict[str, Any], metrics: dict[str, Any], stop_asked: bool) -> str:
        summary["files_consumed"] = metrics.get("epoch", 0)  # the epochs of --follow are files
        summary["stop_reason"] = "interrupted" if stop_asked else "idle"
        return "stopped" if stop_asked else "finished"

    return _launch(
        config, run_dir, address, verbose, shown, start, stops="after the file in hand", close=close
    )


def _launch(
    config: Config,
    run_dir: Location,
    address: str | None,
    verbose: bool,
    shown: progress.Watch,
    start: Callable[[Location], tuple[Callable, Any]],
    *,
    stops: str,
    close: Callable[[dict[str, Any], dict[str, Any], bool], str],
    callbacks: Sequence[Any] = (),
    local: bool = False,
) -> Result:
    """What train and follow share once their checks passed: hold the run directory, start
    or join Ray, build the trainer from `start(stop_file)` (the loop and its spec), and run it.
    A failure before training leaves a new run's directory as it was not (the lock discards
    it); the lock is released at the end, on failure and Ctrl-C too. `close` gets whether a
    stop was asked for (the first Ctrl-C or SIGTERM) and returns the status to mark.
    `local`: no Ray; `start` gives the spec of raymb.driver.local's processes."""
    if local:
        return _launch_local(config, run_dir, shown, start, stops=stops, close=close)
    lock = lock_run(run_dir)
    with ExitStack() as held:  # closed last to first: the log, then the lock
        held.callback(lock.release)  # on failure and Ctrl-C too
        try:
            claim_run(run_dir, config)  # a resumed run must fit its checkpoints
            # The log starts once the run is ours: a refused resume leaves its directory as is.
            # It closes after a failure's discard: a run discarded uploads no log.
            ray_log = held.enter_context(ray_log_of(run_dir, verbose, shown.say))
            stamp("checked")
            shown.phase("starting Ray")
            from raymb.driver.cluster import TrainingFailed, make_trainer

            # Ray from here on, not before the last refusal
            cpus = start_ray(config, address, ray_log)
            stop_file = run_dir / STOP_FILE
            stop_file.remove()  # left by an earlier run
            loop, spec = start(stop_file)
            stamp("read")
            trainer = make_trainer(config, loop, {"spec": spec}, cpus, run_dir, callbacks)
        except BaseException:
            shown.close()
            lock.discard()  # a new run that never started leaves nothing; an older one is kept
            raise
        try:
            done = lambda summary, metrics: close(summary, metrics, stop_file.exists())  # noqa: E731
            # From the start of fit() to status.json: the first signal asks for the stop (the
            # closing sequence finishes as it is), a later one abandons.
            with StopSignals(lambda: ask_stop(stop_file, stops, shown.say)):
                fit = lambda: in_thread(trainer.fit)  # noqa: E731
                return _run(config, lock, fit, shown=shown, close=done, failed=TrainingFailed)
        finally:
            stop_file.remove()


def _launch_local(
    config: Config,
    run_dir: Location,
    shown: progress.Watch,
    start: Callable[[Location], tuple[Callable, Any]],
    *,
    stops: str,
    close: Callable[[dict[str, Any], dict[str, Any], bool], str],
) -> Result:
    """_launch for --local: the same lock, closing sequence and stop, with the workers as
    processes on this machine (raymb.driver.local.LocalFit), started and waited for on this
    (main) thread, where the stop signals are handled. Neither Ray nor torch is imported here."""
    from raymb.driver.local import LocalFit, WorkerFailed, notice

    lock = lock_run(run_dir)
    with ExitStack() as held:
        held.callback(lock.release)  # on failure and Ctrl-C too
        try:
            claim_run(run_dir, config)  # a resumed run must fit its checkpoints
            stamp("checked")
            stop_file = run_dir / STOP_FILE
            stop_file.remove()  # left by an earlier run
            _, spec = start(stop_file)
            stamp("read")
            shown.say(notice(config))
            fit = LocalFit(config, spec)
        except BaseException:
            shown.close()
            lock.discard()  # a new run that never started leaves nothing; an older one is kept
            raise
        try:
            done = lambda summary, metrics: close(summary, metrics, stop_file.exists())  # noqa: E731
            with StopSignals(lambda: ask_stop(stop_file, stops, shown.say)):
                return _run(config, lock, fit.fit, shown=shown, close=done, failed=WorkerFailed)
        finally:
            stop_file.remove()


def ask_stop(stop_file: Location, stops: str, say: Callable[[str], None]) -> None:
    """Write `stop_file`, asking the workers to checkpoint and return (`stops` says when, for
    the line `say` prints), as raymb.driver.cluster.ask_stop does; no Ray here."""
    stop_file.write_bytes(b"")
    say(f"raymb: stopping {stops}, then checkpointing (Ctrl-C again to abandon it)")


@contextmanager
def ray_log_of(
    run_dir: Location, verbose: bool, say: Callable[[str], None]
) -> Iterator[RayLog | None]:
    """The run's logs/ray.log for Ray's lines (raymb.driver.logs), `say` showing those a user
    must see; closed (a bucket run's uploaded) as the block ends. None with `verbose`: Ray
    prints its lines itself."""
    ray_log = None if verbose else RayLog(run_dir, say=say)
    try:
        yield ray_log
    finally:
        close_log(ray_log)


def start_ray(config: Config, address: str | None, ray_log: RayLog | None) -> float:
    """Start Ray here or join the one at `address` (raymb.driver.cluster.connect), its lines to
    `ray_log`, and stamp the start-up's timeline; the CPUs to give each worker."""
    from raymb.driver.cluster import connect, session_dir

    cpus = connect(config, address, ray_log=ray_log)
    stamp("ray", session_dir=session_dir() if timeline_enabled() else None)
    return cpus


def epochs_spec(
    config: Config,
    plan: Plan,
    run_dir: Location,
    train_info: DatasetInfo,
    val_info: DatasetInfo | None,
    cached: bool,
) -> EpochsSpec:
    """What the epoch loop's workers get under Ray (`raymb train`'s, and `raymb lr-find`'s in
    its LrFindSpec): data.train and data.val as Ray reads them, `cached` or streamed
    (raymb.driver.cluster.data_spec), and with data.folds the fold's held-out rows to validate."""
    from raymb.driver.cluster import data_spec
    from raymb.worker.spec import EpochsSpec, validation

    train = data_spec(train_info, config, cached)
    val = data_spec(val_info, config, cached, "data.val") if val_info else None
    return EpochsSpec(
        config=config,
        plan=plan,
        run_dir=run_dir,
        train=train,
        val=validation(config, train, val),
        tokenizer=tokenizer_spec(config),
    )


def _run(
    config: Config,
    lock: RunLock,
    fit: Callable[[], Any],
    *,
    shown: progress.Watch,
    close: Callable[[dict[str, Any], dict[str, Any]], str],
    failed: type[BaseException] | tuple[type[BaseException], ...] = (),
) -> Result:
    """Run `fit` with progress (`shown`, closed here) and tracking; then the closing sequence.
    `close` adds the mode's own keys to the summary and returns the status to mark; `failed`:
    what fit raises when the workers fail (Ray Train's error, or raymb.driver.launch's)."""
    run_dir = lock.run_dir
    try:
        mark(run_dir, "running")
        tracker = start_tracking(config, run_dir, resumed=not lock.created)
    except BaseException:
        shown.close()
        raise
    started = time.perf_counter()
    try:
        with shown:
            shown.phase(_starting(config))
            shown.follow_rows(tracker.log_rows)
            result = fit()
        stamp("fit done")
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        tracker.finish(summary=None, status="KILLED" if interrupted else "FAILED", files={})
        if interrupted:  # the second Ctrl-C: abandoned at once, the last checkpoint kept
            _mark_quietly(run_dir, "interrupted")
        if isinstance(e, failed):
            _failed(e, config, lock)
        raise
    summary = _summary(result, time.perf_counter() - started, config, run_dir)
    status = close(summary, result.metrics or {})
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
    return Result(run_dir=run_dir, summary=summary, status=status)


def _starting(config: Config) -> str:
    """The phase from fit() to the first step: Ray Train starts the workers, they read."""
    low, high = config.scale.min_workers, config.scale.max_workers
    workers = f"{low}-{high}" if config.scale.elastic and low != high else str(high)
    return f"starting {workers} worker{'' if workers == '1' else 's'}"


def _failed(error: BaseException, config: Config, lock: RunLock) -> None:
    """The workers failed: say it in one line, with what was kept (a new run that bad data
    stopped before any checkpoint leaves nothing)."""
    run_dir = lock.run_dir
    latest = _latest(run_dir)
    bad_data = _data_error(error)
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
    mark_failed(run_dir, _first_line(error))
    raise RaymbError(f"training failed: {_first_line(error)} ({kept})") from error


def _latest(run_dir: Location) -> Location | None:
    """The run's newest complete checkpoint, whichever launcher wrote it."""
    from raymb.worker.session import newest_checkpoint  # no torch, no Ray

    newest = newest_checkpoint(run_dir)
    if newest is not None:
        return newest.location
    return latest_checkpoint(run_dir)[0]


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


def finish_tracking(tracker: Tracker, summary: dict[str, Any], run_dir: Location) -> None:
    """End the tracked run with summary.json and the best model as artifacts."""
    files = {"summary.json": run_dir / "summary.json"}
    if summary.get("best_checkpoint"):
        files[MODEL_FILE] = storage.resolve(summary["best_checkpoint"])
    tracker.finish(summary=summary, status="FINISHED", files=files)


def mark_failed(run_dir: Location, error: str) -> None:
    """status.json says failed, unless the store is what failed: the error at hand is the news."""
    _mark_quietly(run_dir, "failed", error=error)


def _mark_quietly(run_dir: Location, status: str, **fields: Any) -> None:
    """mark, but a store that fails is no news beside the error at hand."""
    try:
        mark(run_dir, status, **fields)
    except (StorageError, OSError):
        pass


def _best_checkpoint(result, config: Config, run_dir: Location) -> str | None:
    scored = [
        (m[config.checkpoint.metric], run_dir.on_same(c.path))
        for c, m in (result.best_checkpoints or [])
        if m.get(config.checkpoint.metric) is not None
    ]
    if not scored:
        return None
    pick = min if config.checkpoint.mode == "min" else max
    return f"{pick(scored)[1]}/{MODEL_FILE}"


def _summary(result, wall_s: float, config: Config, run_dir: Location) -> dict[str, Any]:
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


def _noise_summary(metrics: dict[str, Any], config: Config) -> dict[str, Any]:
    """train.noise_scale: the last estimate, and the G the result table compares it with."""
    if not config.train.noise_scale:
        return {}
    G = config.train.global_batch_size
    return {"grad_noise_scale": metrics.get("grad_noise_scale"), "global_batch_size": G}


def _data_error(error: BaseException) -> str | None:
    """The message of a DataError a worker raised, from Ray's wrapped traceback."""
    marker = f"{DataError.__name__}: "
    found = [line for line in str(error).splitlines() if marker in line]
    return found[-1].split(marker, 1)[1].strip() if found else None  # the last one raised


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    # Ray wraps the worker's traceback; its last line is the worker's own error.
    return lines[-1] if lines else text
