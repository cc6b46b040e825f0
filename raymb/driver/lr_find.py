"""`raymb lr-find`: the learning-rate range test on the run's real workers, data and sync.

Checks first, as `raymb train` does (raymb.driver.preflight: nothing of Ray or the workers
imported before the last refusal), then the config's initial state trained for --steps steps
while the rate grows exponentially (raymb.worker.lr_find), in its own directory
<run.storage_path>/<run.name>-lr-find/ (lr_find.json, lr_find.csv, lr_find.png, logs/ray.log).
The run's own directory is never touched, so a later `raymb train` starts from scratch. The
suggestion (raymb.core.lr_find.suggest) is for the config's global batch on its workers.

What lr-find keeps safe (issue 34):

- **Only its own folder is cleared** (raymb.rundir.lr_find_folder). lr_find.json marks a
  folder as an lr-find's output. A folder holding anything an lr-find does not write (run.json,
  checkpoints, summary.json, ...), or an lr_find.json that is not an lr-find's, is refused in
  one line before anything is written; an older lr-find's folder (no lr_find.json) is
  recognised when it holds nothing but what lr-find writes, its lr_find.csv with lr-find's
  header. Each known file is removed by name; the folder itself never is.
- **One lr-find a folder.** The run lock (raymb.rundir.lock) is held on it from before the
  first removal to the end: a second lr-find of the same name is refused naming the first's
  host and pid (checked read-only before the data checks, taken after them).
- **A stop says so.** The first Ctrl-C or SIGTERM asks the workers to stop at the next step
  (the STOP file, as `raymb train`); the curve so far stays in lr_find.csv, lr_find.json says
  "interrupted", and `Interrupted` carries the line the command prints (exit 130). A second
  signal abandons the test at once, marked the same way.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raymb.config import Config
from raymb.core.lr_find import CSV_FILE, Curve, schedule, suggest
from raymb.driver.preflight import check_run_dir, prepare
from raymb.driver.report import plot
from raymb.driver.signals import StopSignals, in_thread
from raymb.errors import RaymbError, StorageError
from raymb.rundir.lock import lock_run
from raymb.rundir.lr_find_folder import (
    MARKER_FILE,
    PNG_FILE,
    STOP_FILE,
    check_own_folder,
    clear_own_folder,
    mark,
)
from raymb.storage import Location

SUFFIX = "-lr-find"


@dataclass(frozen=True)
class LrFindResult:
    out_dir: Location
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested: float | None
    stop_reason: str | None


class Interrupted(KeyboardInterrupt):
    """The test was stopped by Ctrl-C or SIGTERM: the line to print (raymb.cli.lr_find exits
    130 with it). A KeyboardInterrupt, so that whoever does not know it still stops."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


def finder_config(config: Config) -> Config:
    """The config the range test runs: the same, named <run.name>-lr-find."""
    run = dataclasses.replace(config.run, name=f"{config.run.name}{SUFFIX}")
    return dataclasses.replace(config, run=run)


def lr_find(
    config: Config,
    *,
    low: float,
    high: float,
    steps: int,
    address: str | None = None,
    verbose: bool = False,
    backend: str | None = None,
    model: Any = None,
    loss: Any = None,
    metrics: Any = None,
) -> LrFindResult:
    """Run the range test; write lr_find.csv and lr_find.png and return the curve and the
    suggestion. On a Ray cluster (started here, or the one at `address`); with `backend`
    ("gloo", "nccl") on scale.workers local processes of a plain torch.distributed group
    instead, no Ray (raymb.driver.local). Interrupted when stopped by a signal. `model`,
    `loss`, `metrics`: your own, from Python, as raymb.train takes them."""
    from raymb.driver.custom import custom_code

    name = config.run.name
    config = finder_config(config)
    out_dir = check_run_dir(config)  # no other driver holds it: before the data checks
    check_own_folder(out_dir)
    plan, train_info, _ = prepare(config)
    code = custom_code(config, plan, train_info, model=model, loss=loss, metrics=metrics)
    lrs = tuple(schedule(low, high, steps))
    with _sigterm_interrupts():
        record = {"run": name, "min": low, "max": high, "steps": steps}
        found = (plan, train_info, code)
        return _locked(config, record, out_dir, found, lrs, address, verbose, backend)


def _locked(config, record, out_dir, found, lrs, address, verbose, backend):
    """The test in its folder, under the folder's lock from before the first removal to the
    end; the folder's lr_find.json says how it ended (`record`: what it names the test by)."""
    steps = len(lrs)
    lock = lock_run(out_dir)
    try:
        check_own_folder(out_dir)  # again, now that it is ours: nothing came in meanwhile
        clear_own_folder(out_dir)  # an earlier test's: each starts from the initial state
        mark(out_dir, "running", record)
        stop_file = out_dir / STOP_FILE
        try:
            if backend is None:
                _on_ray(config, found, lrs, out_dir, address, verbose, stop_file)
            else:
                _on_torch(config, found, lrs, backend, stop_file)
        except BaseException as e:
            asked = stop_file.exists()
            if asked or isinstance(e, KeyboardInterrupt | SystemExit):
                # After a stop was asked, whatever ended the workers (a signal that reached
                # Ray's processes too) is the stop; SystemExit is Ray's SIGTERM handler,
                # installed by ray.init, before the test's own handlers.
                raise _interrupted(out_dir, steps, record) from None
            mark(out_dir, "failed", record, error=_first_line(e), quiet=True)
            raise
        text = (out_dir / CSV_FILE).read_text()
        if stop_file.exists() and not _complete(text, steps):
            raise _interrupted(out_dir, steps, record)
        result = finish(out_dir, text)
        mark(out_dir, "finished", record, steps_done=len(result.lrs), suggested=result.suggested)
        return result
    finally:
        _remove_quietly(out_dir / STOP_FILE)
        lock.release()


def _on_ray(config, found, lrs, out_dir, address, verbose, stop_file) -> None:
    """The test's workers under Ray Train, started as `raymb train` starts its own
    (raymb.driver.run: Ray's log, Ray, the epoch loop's spec)."""
    from raymb.driver.run import epochs_spec, ray_log_of, start_ray

    plan, train_info, code = found
    with ray_log_of(out_dir, verbose, print) as ray_log:
        cpus = start_ray(config, address, ray_log)
        from raymb.driver.cluster import make_trainer, use_cache
        from raymb.worker.lr_find import lr_find_loop
        from raymb.worker.spec import LrFindSpec

        # A fold of cross-validation is an index into the cached rows, as in raymb train.
        cached = use_cache(config, [train_info]) or bool(config.data.folds)
        run = epochs_spec(config, plan, out_dir, train_info, None, cached)
        spec = LrFindSpec(run=dataclasses.replace(run, code=code), lrs=lrs)
        trainer = make_trainer(config, lr_find_loop, {"spec": spec}, cpus, out_dir)
        _say_start(lrs, out_dir)
        _until_stopped(trainer.fit, stop_file)


def _on_torch(config: Config, found, lrs: tuple[float, ...], backend: str, stop_file) -> None:
    """The test's workers on a plain torch.distributed group of local processes (no Ray)."""
    from raymb.driver.launch import run_torch
    from raymb.driver.local import local_spec
    from raymb.worker.spec import LrFindSpec

    plan, train_info, code = found
    spec = LrFindSpec(run=local_spec(config, (plan, train_info, None), code=code), lrs=lrs)
    _say_start(lrs, spec.run.run_dir)
    world = config.scale.max_workers
    _until_stopped(lambda: run_torch(_torch_loop, (spec,), world, backend=backend), stop_file)


def _torch_loop(spec, *, session_factory) -> None:
    """One process of the torch session. Ctrl-C reaches the terminal's whole process group:
    these processes leave it to the driver, which asks them to stop through the STOP file,
    as Ray's workers are asked."""
    from raymb.worker.lr_find import lr_find_loop

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lr_find_loop({"spec": spec}, session_factory(Path(spec.run.run_dir.path)))


def _say_start(lrs: tuple[float, ...], out_dir: Location) -> None:
    print(
        f"raymb: lr-find: {len(lrs)} steps, lr {lrs[0]:g} to {lrs[-1]:g}, in {out_dir}", flush=True
    )


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM as Ctrl-C from the lock to the workers' start (importing Ray takes seconds), so
    the folder is marked and the lock released; Ray's own handler (ray.init) and the test's
    (_until_stopped) take over in turn."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _until_stopped(fit: Callable[[], None], stop_file: Location) -> None:
    """fit() on a thread, the main thread taking the signals (raymb.driver.signals): the first
    SIGINT or SIGTERM writes `stop_file` (the workers stop at the next step and keep the curve
    so far), a later one raises KeyboardInterrupt at once."""

    def ask() -> None:
        stop_file.write_bytes(b"")
        print(
            "raymb: lr-find: stopping at the next step (Ctrl-C again to abandon it)",
            file=sys.stderr,
            flush=True,
        )

    with StopSignals(ask):
        in_thread(fit)


def _complete(csv_text: str, steps: int) -> bool:
    """Whether a curve is the whole test: every step taken, or the stop rule met (a stop
    asked for as the test ended changes nothing)."""
    from raymb.worker.lr_find import read_curve

    lrs, losses = read_curve(csv_text)
    curve = Curve()
    return any(curve.add(lr, loss) for lr, loss in zip(lrs, losses)) or len(lrs) >= steps


def _interrupted(out_dir: Location, steps: int, record: dict[str, Any]) -> Interrupted:
    """Mark the folder interrupted (the curve so far kept, no rate suggested); the line."""
    try:
        done = len((out_dir / CSV_FILE).read_text().splitlines()) - 1
    except (FileNotFoundError, OSError, StorageError, UnicodeDecodeError):
        done = 0
    mark(out_dir, "interrupted", record, steps_done=max(done, 0), quiet=True)
    kept = f"its curve so far is in {out_dir / CSV_FILE}" if done > 0 else "no step was measured"
    return Interrupted(
        f"raymb: interrupted; lr-find stopped after {max(done, 0)} of {steps} steps and "
        f"suggests no rate ({kept}; {out_dir / MARKER_FILE} says interrupted): run it again "
        "for a suggestion"
    )


def _remove_quietly(location: Location) -> None:
    try:
        location.remove()
    except (OSError, StorageError):
        pass


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# ---------------------------------------------------------------- the curve and its reading


def finish(out_dir: Location, csv_text: str) -> LrFindResult:
    """The suggestion from lr_find.csv (the curve replayed: the same stop as the workers'),
    and lr_find.png beside it."""
    from raymb.worker.lr_find import read_curve

    lrs, losses = read_curve(csv_text)
    curve = Curve()
    for lr, loss in zip(lrs, losses):
        curve.add(lr, loss)
    suggested = suggest(curve.lrs, curve.smoothed)
    plot.write_lr_find_plot(curve.lrs, curve.losses, curve.smoothed, suggested, out_dir / PNG_FILE)
    return LrFindResult(out_dir, lrs, losses, curve.smoothed, suggested, curve.stop_reason)


def conclude(result: LrFindResult, steps: int) -> str:
    """The last line to print, or a RaymbError when the curve suggests nothing."""
    done = len(result.lrs)
    if result.stop_reason is not None:
        print(f"raymb: lr-find: stopped at step {done} of {steps}: {result.stop_reason}")
    if result.suggested is None:
        where = f"{result.out_dir}/lr_find.csv"
        if done < 10 or result.stop_reason is not None:
            raise RaymbError(
                f"lr-find: the loss diverged within {done} step(s), from the first rates: "
                f"nothing to suggest; try a lower --min (the curve is in {where})"
            )
        raise RaymbError(f"lr-find: the loss never fell: nothing to suggest (see {where})")
    return f"raymb: suggested optim.lr={result.suggested:.3g}"
