"""The driver's run path: `raymb train` and `raymb train --follow DIR` share it.

Both check everything before Ray starts (raymb.driver.preflight: neither Ray nor the worker
modules are imported until the checks pass), hold the run directory's lock (raymb.rundir.lock)
to the end, start or join Ray and build the TorchTrainer (raymb.driver.cluster), then run it
through one closing sequence (raymb.driver.closing): progress and tracking while it runs; on
failure a one-line error that says what was kept; at the end summary.json, loss.png, the
tracked run's artifacts, status.json.

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

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from raymb.config import Config
from raymb.data.checks import DatasetInfo, describe_shape
from raymb.driver.closing import finish_run, mark_quietly, raise_failure, start_tracking, summarize
from raymb.driver.logs import RayLog, close_log
from raymb.driver.preflight import check_run_dir, prepare, prepare_follow, tokenizer_spec
from raymb.driver.report import progress
from raymb.driver.signals import Interrupts, StopSignals, ask_stop, in_thread
from raymb.errors import RaymbError
from raymb.rundir.checkpoint import claim_run
from raymb.rundir.lock import RunLock, lock_run
from raymb.rundir.runs import mark
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
    model: Any = None,
    loss: Any = None,
    metrics: Any = None,
) -> Result:
    """Train as configured and return the run's summary (also written to summary.json).
    Ray's own lines go to <run dir>/logs/ray.log; `verbose` shows them on the terminal.
    `model`, `loss`, `metrics`: your own, from Python (a module or factory, callables,
    closures; raymb.driver.custom), in place of model.name, loss.name and metrics.name.

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
    from raymb.driver.custom import custom_code

    code = custom_code(config, plan, train_info, model=model, loss=loss, metrics=metrics)
    shown = progress.Watch(run_dir / "metrics.csv", plan.total_steps, stream)

    def start(stop_file: Location) -> tuple[Callable, Any]:
        if local:  # the whole set in memory, read here as Ray's cache holds it
            from raymb.driver.local import local_spec

            shown.say(_data_line(config, plan, train_info))
            return None, local_spec(config, (plan, train_info, val_info), run_dir, code)
        from raymb.driver.cluster import use_cache

        # A fold of cross-validation is an index into the cached rows.
        cached = use_cache(config, [train_info, val_info]) or bool(config.data.folds)
        shown.say(_data_line(config, plan, train_info))
        if cached:
            shown.phase("reading data")  # submitting the read tasks; the workers wait on them
        spec = epochs_spec(config, plan, run_dir, train_info, val_info, cached)
        spec = dataclasses.replace(spec, code=code)
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
            # A Ctrl-C before training starts abandons the start (a new run leaves nothing),
            # even one that reaches Ray's start-up, which can catch it (signals.Interrupts).
            with Interrupts():
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
            mark_quietly(run_dir, "interrupted")
        if isinstance(e, failed):
            raise_failure(e, config, lock)
        raise
    summary = summarize(result, time.perf_counter() - started, config, run_dir)
    status = close(summary, result.metrics or {})
    finish_run(run_dir, summary, status, tracker)
    return Result(run_dir=run_dir, summary=summary, status=status)


def _starting(config: Config) -> str:
    """The phase from fit() to the first step: Ray Train starts the workers, they read."""
    low, high = config.scale.min_workers, config.scale.max_workers
    workers = f"{low}-{high}" if config.scale.elastic and low != high else str(high)
    return f"starting {workers} worker{'' if workers == '1' else 's'}"
