"""Plots of metrics.csv: a run's loss.png, and `raymb plot` overlaying several runs.

matplotlib is an optional extra (`pip install raymb[plot]`): without it a run writes no
loss.png and `raymb plot` says how to get it. Figures are drawn on the Agg canvas, never
through pyplot, so no display, GUI backend or global figure state is involved.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raymb.errors import RaymbError
from raymb.files import check_output
from raymb.storage import Location, temp_sibling

PLOT_FILE = "loss.png"
METRICS_FILE = "metrics.csv"
INSTALL_HINT = "matplotlib is not installed; pip install 'raymb[plot]' (or matplotlib)"


@dataclass
class Series:
    """The columns of one run's metrics.csv that the plots draw."""

    label: str
    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    samples_per_s: list[float] = field(default_factory=list)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def read_metrics(run_dir: str | Path, label: str | None = None) -> Series:
    """The run's metrics.csv as series; a missing file is a RaymbError naming it."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise RaymbError(f"{run_dir}: no {METRICS_FILE} (is it a run directory?)")
    series = Series(label=label or run_dir.name)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = _float(row.get("step"))
            if step is None:
                continue
            train_loss, val_loss = _float(row.get("train_loss")), _float(row.get("val_loss"))
            series.step.append(int(step))
            series.train_loss.append(math.nan if train_loss is None else train_loss)
            rate = _float(row.get("samples_per_s"))
            series.samples_per_s.append(math.nan if rate is None else rate)
            # val_loss repeats the last validation until the next: plot each value once
            if val_loss is not None and (not series.val_loss or val_loss != series.val_loss[-1]):
                series.val_step.append(int(step))
                series.val_loss.append(val_loss)
    return series


def write_run_plot(run_dir: str | Path | Location) -> Path | None:
    """Write run_dir/loss.png from its metrics.csv; None without matplotlib or metrics. A run
    in an object store is drawn from a local copy and the picture uploaded."""
    if not have_matplotlib():
        return None
    if isinstance(run_dir, Location) and not run_dir.local:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / run_dir.name
            local.mkdir()
            try:
                (run_dir / METRICS_FILE).fetch(local)
            except FileNotFoundError:
                return None
            drawn = write_run_plot(local)
            if drawn is not None:
                (run_dir / PLOT_FILE).write_bytes(drawn.read_bytes())
        return None
    run_dir = Path(run_dir)
    try:
        series = read_metrics(run_dir)
    except RaymbError:
        return None
    if not series.step:
        return None
    return _draw([series], run_dir / PLOT_FILE, title=run_dir.name)


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, *, force: bool = False) -> Path:
    """Overlay the runs' loss and throughput in one figure, labelled by run directory name.
    `out` lies in none of the run directories, is no folder or device, and replaces an
    existing file only with `force`: checked before anything is read or drawn."""
    check_output(out, "--out", inputs=[(d, "RUN_DIR") for d in run_dirs], force=force)
    if not have_matplotlib():
        raise RaymbError(INSTALL_HINT)
    dirs = [Path(d) for d in run_dirs]
    names = [d.resolve().name for d in dirs]
    # Two runs of the same name in different storage paths: label them by the path given.
    labels = [str(d) if names.count(n) > 1 else n for d, n in zip(dirs, names)]
    series = [read_metrics(d, label) for d, label in zip(dirs, labels)]
    empty = [s.label for s in series if not s.step]
    if empty:
        raise RaymbError(f"{empty[0]}: {METRICS_FILE} has no rows yet")
    return _draw(series, Path(out), title=" vs ".join(labels))


def _draw(runs: list[Series], out: Path, *, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, rate_ax = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for s, color in zip(runs, colors):
        name = f"{s.label}: " if len(runs) > 1 else ""
        loss_ax.plot(s.step, s.train_loss, color=color, label=f"{name}train loss")
        if s.val_loss:
            loss_ax.plot(
                s.val_step,
                s.val_loss,
                color=color,
                linestyle="--",
                marker="o",
                markersize=3,
                label=f"{name}val loss",
            )
        rate_ax.plot(s.step, s.samples_per_s, color=color, label=s.label)
    if _log_scale_fits([s.train_loss + s.val_loss for s in runs]):
        loss_ax.set_yscale("log")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title(title)
    loss_ax.grid(True, alpha=0.3)
    loss_ax.legend(fontsize="small")
    rate_ax.set_ylabel("samples/s")
    rate_ax.set_xlabel("step")
    rate_ax.set_ylim(bottom=0)
    rate_ax.grid(True, alpha=0.3)
    if len(runs) > 1:
        rate_ax.legend(fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)  # unique: two writers of one picture do not collide
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _log_scale_fits(values: list[list[float]]) -> bool:
    """Loss spanning more than two decades, all positive: a log axis shows all of it."""
    finite = [v for vs in values for v in vs if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 100


def _float(text: Any) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def write_lr_find_plot(
    lrs: list[float], losses: list[float], smoothed: list[float], suggested: float | None, out
) -> bool:
    """lr_find.png: the range test's loss and smoothed loss against the rate (log axis), the
    suggestion marked; `out` a Location. False without matplotlib."""
    if not have_matplotlib():
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    finite = [(lr, v) for lr, v in zip(lrs, losses) if math.isfinite(v)]
    ax.plot([p[0] for p in finite], [p[1] for p in finite], color="C0", alpha=0.35, label="loss")
    ax.plot(lrs, smoothed, color="C0", label="smoothed loss")
    if suggested is not None:
        ax.axvline(suggested, color="C3", linestyle="--", label=f"suggested lr = {suggested:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate range test")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    out.write_bytes(buffer.getvalue())
    return True
