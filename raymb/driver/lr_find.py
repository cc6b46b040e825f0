"""`raymb lr-find`: the learning-rate range test on the run's real workers, data and sync.

Checks first, as `raymb train` does (raymb.driver.preflight: nothing of Ray or the workers
imported before the last refusal), then the config's initial state trained for --steps steps
while the rate grows exponentially (raymb.worker.lr_find), on its own run directory
<run.storage_path>/<run.name>-lr-find/ (lr_find.csv, lr_find.png), made afresh each time. The
run's own directory is never touched, so a later `raymb train` starts from scratch. The
suggestion (raymb.core.lr_find.suggest) is for the config's global batch on its workers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from raymb.config import Config
from raymb.core.lr_find import Curve, schedule, suggest
from raymb.driver.preflight import check_run_dir, prepare, tokenizer_spec
from raymb.errors import RaymbError
from raymb.rundir import plot
from raymb.rundir.storage import Location

SUFFIX = "-lr-find"
PNG_FILE = "lr_find.png"


@dataclass(frozen=True)
class LrFindResult:
    out_dir: Location
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggested: float | None
    stop_reason: str | None


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
) -> LrFindResult:
    """Run the range test on a Ray cluster (started here, or the one at `address`); write
    lr_find.csv and lr_find.png and return the curve and the suggestion."""
    config = finder_config(config)
    out_dir = check_run_dir(config)
    plan, train_info, _ = prepare(config)
    lrs = tuple(schedule(low, high, steps))
    out_dir.remove()  # an earlier test's: each starts from the config's initial state
    out_dir.mkdir()
    from raymb.driver.cluster import connect, data_spec, make_trainer, use_cache
    from raymb.driver.logs import RayLog, close_log
    from raymb.worker.lr_find import CSV_FILE, lr_find_loop
    from raymb.worker.spec import EpochsSpec, LrFindSpec

    ray_log = None if verbose else RayLog(out_dir, say=print)
    try:
        cpus = connect(config, address, ray_log=ray_log)
        cached = use_cache(config, [train_info])
        run = EpochsSpec(
            config=config,
            plan=plan,
            run_dir=out_dir,
            train=data_spec(train_info, config, cached),
            tokenizer=tokenizer_spec(config),
        )
        spec = LrFindSpec(run=run, lrs=lrs)
        print(f"raymb: lr-find: {steps} steps, lr {low:g} to {high:g}, in {out_dir}", flush=True)
        make_trainer(config, lr_find_loop, {"spec": spec}, cpus, out_dir).fit()
    finally:
        close_log(ray_log)
    return finish(out_dir, (out_dir / CSV_FILE).read_text())


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
