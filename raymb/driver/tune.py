"""`raymb tune`: a sweep on Ray Tune, each trial an ordinary raymb run.

A `Tuner` over a function trainable (Train V2's pattern): each trial builds its TorchTrainer
through raymb.driver.run.train with the trial's config, its run directory
<sweep>/trials/<trial>/ named after the trial (no timestamp, so a resumed trial finds its own
checkpoints), and reports to Tune at each validation (TuneReportCallback). Under
cross-validation a trial trains its folds one after another (<trial>/fold-<f>/) and reports
their mean. A trial's driver holds a hundredth of a CPU (ray-project/ray#54305: at one CPU it
can starve the next trial's workers), taken from its workers' share.

Starting the same sweep again restores it (Tuner.restore): finished trials are kept, the
others resume from their latest checkpoint, and a trial whose run already trained to its end
(the sweep was killed before Tune recorded it) reports its summary without training again.
The first Ctrl-C or SIGTERM ends the sweep as Tune's own SIGINT does (the experiment state
saved, the running trials ended at their last checkpoint): trials.csv and tune.json say
"interrupted", and no best.toml is written. A new sweep that fails before any trial started
leaves no folder. Besides raymb.driver.cluster and raymb.driver.ray_compat the only driver
module that imports Ray: the Ray-specific part of a sweep is here, the rest in
raymb.config.tune, raymb.driver.tune_trials (what the trials come to) and raymb.rundir.sweep.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from raymb.config import Config
from raymb.config.tune import Sweep
from raymb.driver import ray_compat
from raymb.driver.cluster import connect
from raymb.driver.logs import RayLog, close_log
from raymb.driver.signals import StopSignals
from raymb.driver.tune_trials import (
    final_metrics,
    location,
    name_of,
    summary_if_finished,
    trial_row,
)
from raymb.rundir import sweep as out

DRIVER_CPU = 0.01
"""CPUs a trial's driver holds (its workers hold the rest of the trial's share)."""


def run_sweep(
    sweep: Sweep,
    sweep_dir: Path,
    *,
    address: str | None,
    verbose: bool,
    code: dict[str, bytes] | None = None,
):
    """Run (or resume) the sweep in `sweep_dir`; write its outputs; return a TuneResult.
    A sweep that fails (or is interrupted) before any trial started leaves `sweep_dir` as it
    found it, so that its name stays free. `code`: raymb.tune(model=, loss=, metrics=)'s,
    cloudpickled (raymb.driver.custom.pickled), for every trial."""
    with out.removed_unless_started(sweep_dir):
        out.write_record(sweep, sweep_dir)
        return _run_sweep(sweep, sweep_dir, address=address, verbose=verbose, code=code or {})


def _run_sweep(sweep: Sweep, sweep_dir: Path, *, address: str | None, verbose: bool, code):
    config = sweep.config
    sweep = _absolute(sweep)  # a trial runs in Tune's trial directory
    # Tune's own output engine prints tables and trial events on the driver's terminal:
    # the sweep's progress line (_Progress) takes their place.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # The trials' own raymb lines stay in the log: the sweep's progress line stands for them.
    say = lambda line: None if line.startswith("raymb:") else print(line, flush=True)  # noqa: E731
    ray_log = None if verbose else RayLog(location(sweep_dir), say=say)
    try:
        cpus = connect(config, address, ray_log=ray_log)
        if ray_log is not None:
            print(f"raymb: Ray's own messages go to {ray_log.shown} (--verbose shows them here)")
        W = config.scale.max_workers
        worker_cpus = None if config.scale.use_gpu else max(cpus - DRIVER_CPU / W, DRIVER_CPU)
        total = ray.cluster_resources().get("CPU", 0)
        concurrent = sweep.tune.max_concurrent or max(1, int((total - 1 + 1e-9) // (W * cpus)))
        trainable = tune.with_resources(
            tune.with_parameters(
                _trial,
                sweep=sweep,
                trials_dir=str(sweep_dir / out.TRIALS_DIR),
                cpus=worker_cpus,
                code=code,
            ),
            {"cpu": DRIVER_CPU},
        )
        shown = _Progress(sweep, _planned(sweep))
        run_config = tune.RunConfig(
            name=sweep_dir.name,
            storage_path=str(sweep_dir.parent),
            verbose=0,
            callbacks=[shown, _Cleanup(sweep_dir / out.TRIALS_DIR)],
        )
        if tune.Tuner.can_restore(str(sweep_dir)):
            print(f"raymb: resuming the sweep in {sweep_dir}", flush=True)
            tuner = tune.Tuner.restore(
                str(sweep_dir), trainable, resume_unfinished=True, param_space=_space(sweep)
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=_space(sweep),
                tune_config=_tune_config(sweep, concurrent),
                run_config=run_config,
            )
        with _Interruptible() as stop:
            grid = tuner.fit()
        shown.close()
        _Cleanup(sweep_dir / out.TRIALS_DIR).remove_left([name_of(r) for r in grid], wait_s=10.0)
        live = shown.live if stop.asked else set()
        rows = [trial_row(sweep, r, sweep_dir, interrupted=name_of(r) in live) for r in grid]
    finally:
        close_log(ray_log)
    return out.write_outputs(sweep, rows, sweep_dir, interrupted=stop.asked)


class _Interruptible:
    """The first SIGINT or SIGTERM ends the sweep as Tune's own SIGINT handler does (its loop
    stops, the experiment state is saved, the running trials are ended); `asked` says it
    came. A later one raises KeyboardInterrupt (raymb.driver.signals.StopSignals: one press
    delivered twice counts once). Tune's SIGINT handler is turned off
    (TUNE_DISABLE_SIGINT_HANDLER) so that the signal is seen here; its SIGUSR1 handler, which
    Tune installs while its loop runs, is what the first signal calls."""

    def __init__(self) -> None:
        self.signals = StopSignals(self._first)
        self.env: str | None = None

    @property
    def asked(self) -> bool:
        return self.signals.asked

    def __enter__(self) -> _Interruptible:
        self.env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self.signals.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.signals.__exit__(*exc)
        if self.env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self.env

    def _first(self) -> None:
        tune_handler = signal.getsignal(signal.SIGUSR1)
        if not callable(tune_handler):
            raise KeyboardInterrupt  # Tune's loop is not running (yet): nothing to stop
        print(
            "raymb: tune: stopping the sweep (the running trials keep their last checkpoint); "
            "Ctrl-C again to abandon it at once",
            file=sys.stderr,
            flush=True,
        )
        tune_handler(signal.SIGINT, None)


def _absolute(sweep: Sweep) -> Sweep:
    """The sweep with data.train and data.val as absolute paths (URIs as they are)."""
    data = dict(sweep.raw.get("data", {}))
    for key in ("train", "val"):
        value = data.get(key, getattr(sweep.config.data, key))
        if isinstance(value, str) and value not in ("", "none") and "://" not in value:
            data[key] = os.path.abspath(os.path.expanduser(value))
    return dataclasses.replace(sweep, raw={**sweep.raw, "data": data})


def _trial(
    values: dict[str, Any],
    *,
    sweep: Sweep,
    trials_dir: str,
    cpus: float | None,
    code: dict[str, bytes],
) -> None:
    """One trial, in its Tune actor: an ordinary raymb run (or one per fold); `code`: your
    own model, loss and metrics given from Python, cloudpickled."""
    import functools

    import cloudpickle

    from raymb.driver.run import train

    own = {k: cloudpickle.loads(v) for k, v in code.items()}
    train = functools.partial(train, **own)

    name = tune.get_context().get_trial_name()
    values = {k: values[k] for k in sweep.keys}
    raw = sweep.trial_raw(values, storage=trials_dir, name=name)
    quiet = open(os.devnull, "w")  # noqa: SIM115 - the progress display, unseen in a trial
    if not sweep.tune.cv_folds:
        config = Config.from_dict(raw)
        done = summary_if_finished(Path(trials_dir) / name)
        if done is not None:  # trained before the sweep was stopped: its files stay as they are
            tune.report(final_metrics(done, config))
            return
        groups = ray_compat.placement_group_recorder(_groups_file(trials_dir, name))
        train(
            _with_cpus(config, cpus),
            verbose=True,
            callbacks=[TuneReportCallback(), groups],
            stream=quiet,
        )
        return
    metrics, steps = [], 0
    for f in range(sweep.tune.cv_folds):
        fold = Config.from_dict(sweep.fold_raw(raw, f, storage=f"{trials_dir}/{name}"))
        run_dir = Path(fold.run.storage_path) / fold.run.name
        summary = summary_if_finished(run_dir)
        if summary is None:
            groups = ray_compat.placement_group_recorder(_groups_file(trials_dir, name))
            summary = train(
                _with_cpus(fold, cpus), verbose=True, callbacks=[groups], stream=quiet
            ).summary
        metrics.append(summary.get(sweep.metric))
        steps += summary.get("steps") or 0
        known = [m for m in metrics if m is not None]
        mean = sum(known) / len(known) if known else None
        std = math.sqrt(sum((m - mean) ** 2 for m in known) / len(known)) if known else None
        tune.report({sweep.metric: mean, f"{sweep.metric}_std": std, "fold": f + 1, "step": steps})


def _groups_file(trials_dir: str, name: str) -> Path:
    """Beside the trial's run directory: the placement groups of its Train runs
    (ray_compat.placement_group_recorder writes them down)."""
    return Path(trials_dir) / f".{name}.placement_groups"


class _Cleanup(tune.Callback):
    """Removes the placement groups that a trial's Train runs left once the trial has ended
    (each checked for a while after: a dying controller may still be starting one).

    When the scheduler stops a trial, Tune ends its actor and Ray Train's controller with it;
    Train's own PlacementGroupCleaner asks the dashboard's State API whether the controller
    lives, which a cluster without a dashboard (raymb's local one) does not have, so the
    workers' CPUs would stay held and the next trials wait forever."""

    WATCH_S = 60.0

    def __init__(self, trials_dir: Path) -> None:
        self.trials_dir = trials_dir
        self.ended: dict[str, float] = {}

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.remove_left([_trial_name(trial)])

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.on_trial_complete(iteration, trials, trial)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if self.ended:
            self.remove_left()

    def remove_left(self, ended: list[str] = (), wait_s: float = 0.0) -> None:
        """Note the trials `ended` now; remove what the ended trials left (waiting up to
        `wait_s` for Ray Train's orphaned cleaners to end: ray_compat.end_orphaned_cleaners)."""
        from ray.util.placement_group import (
            PlacementGroup,
            placement_group_table,
            remove_placement_group,
        )

        now = time.monotonic()
        self.ended.update(dict.fromkeys(ended, now))
        for name, ended_at in list(self.ended.items()):
            try:
                ids = _groups_file(str(self.trials_dir), name).read_text().split()
            except OSError:
                ids = []
            for hex_id in ids:
                group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(hex_id)))
                if placement_group_table(group).get("state") not in (None, "REMOVED"):
                    remove_placement_group(group)
            if now - ended_at > self.WATCH_S:
                del self.ended[name]
        ray_compat.end_orphaned_cleaners(wait_s)


def _with_cpus(config: Config, cpus: float | None) -> Config:
    """The trial's workers' CPUs, their share less the trial driver's (a config that sets
    scale.cpus_per_worker keeps it); numbers do not depend on it."""
    if cpus is None or config.scale.cpus_per_worker is not None:
        return config
    return dataclasses.replace(
        config, scale=dataclasses.replace(config.scale, cpus_per_worker=cpus)
    )


def _space(sweep: Sweep) -> dict[str, Any]:
    """Tune's param_space: one entry per searched key, as written."""
    space: dict[str, Any] = {}
    for d in sweep.space:
        if sweep.tune.search == "grid":
            space[d.key] = tune.grid_search(list(d.values))
        elif d.kind in ("grid", "choice"):
            space[d.key] = tune.choice(list(d.values))
        elif d.kind == "uniform":
            space[d.key] = tune.uniform(*d.values)
        elif d.kind == "loguniform":
            space[d.key] = tune.loguniform(*d.values)
        else:
            space[d.key] = tune.randint(*d.values)
    if sweep.repeats_seed:
        from raymb.config.tune import repeat_seeds

        space["train.seed"] = tune.grid_search(
            repeat_seeds(sweep.config.train.seed, sweep.tune.samples)
        )
    return space


def _tune_config(sweep: Sweep, concurrent: int) -> tune.TuneConfig:
    t = sweep.tune
    search_alg = None
    if t.search == "random":
        from ray.tune.search import BasicVariantGenerator

        search_alg = BasicVariantGenerator(random_state=sweep.config.train.seed)
    elif t.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        optuna = OptunaSearch(metric=sweep.metric, mode=sweep.mode, seed=sweep.config.train.seed)
        search_alg = ConcurrencyLimiter(optuna, max_concurrent=concurrent)
    scheduler = None
    if t.scheduler == "asha":
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="epoch",
            metric=sweep.metric,
            mode=sweep.mode,
            max_t=sweep.config.train.epochs,
            grace_period=t.grace_epochs,
            reduction_factor=t.reduction_factor,
        )
    return tune.TuneConfig(
        metric=None if search_alg is not None or scheduler is not None else sweep.metric,
        mode=None if search_alg is not None or scheduler is not None else sweep.mode,
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=1 if t.search == "grid" else t.samples,
        max_concurrent_trials=concurrent,
        trial_name_creator=_trial_name,
        trial_dirname_creator=lambda trial: f"tune-{_trial_name(trial)}",
    )


def _trial_name(trial) -> str:
    """trial-000, trial-001, ... in the order Tune creates them (its trial id's counter)."""
    counter = trial.trial_id.rsplit("_", 1)[-1]
    return f"trial-{int(counter):03d}" if counter.isdigit() else f"trial-{trial.trial_id}"


def _planned(sweep: Sweep) -> int:
    return sweep.trial_count()


class _Progress(tune.Callback):
    """The sweep's one progress line: trials done, running and left, and the best so far."""

    def __init__(self, sweep: Sweep, planned: int) -> None:
        self.sweep, self.planned = sweep, planned
        self.tty = sys.stderr.isatty()
        self.last = ""
        self.started = time.monotonic()
        self.live: set[str] = set()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.live.discard(_trial_name(trial))

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.live.discard(_trial_name(trial))

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        done = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
        running = [t for t in trials if t.status == "RUNNING"]
        # Not ended by Tune: what an interruption would stop (Tune's clean-up at the end of
        # an interrupted run marks them TERMINATED, and calls no callback).
        self.live = {_trial_name(t) for t in trials if t.status not in ("TERMINATED", "ERROR")}
        left = max(self.planned - len(done) - len(running), 0)
        best = None
        for t in trials:
            value = (t.last_result or {}).get(self.sweep.metric)
            if isinstance(value, int | float) and math.isfinite(value):
                if best is None or (value < best[0]) == (self.sweep.mode == "min"):
                    best = (value, _trial_name(t))
        shown = f"best {self.sweep.metric} {best[0]:.6g} ({best[1]})" if best else "no result yet"
        line = f"raymb: tune: {len(done)} done, {len(running)} running, {left} left; {shown}"
        if line == self.last:
            return
        self.last = line
        if self.tty:
            print(f"\r\x1b[2K{line}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and self.last:
            print(file=sys.stderr, flush=True)
