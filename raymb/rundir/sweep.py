"""What a sweep (`raymb tune`) leaves beside Ray Tune's experiment: trials.csv, best.toml,
tune.json, tune.png, and the table printed at the end. No Ray: the rows come from the driver
(raymb.driver.tune), one dict per trial.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raymb.config import Config, to_toml
from raymb.config.tune import Sweep

TRIALS_FILE = "trials.csv"
BEST_FILE = "best.toml"
TUNE_FILE = "tune.json"
PLOT_FILE = "tune.png"
TRIALS_DIR = "trials"
FINISHED = "finished"
STOPPED_EARLY = "stopped early"


@dataclass(frozen=True)
class TuneResult:
    """A finished sweep: one row per trial (as trials.csv holds them), the best trial's name,
    values, metric and config (best.toml's), and the sweep's directory."""

    path: str
    trials: list[dict[str, Any]]
    best_trial: str | None
    best_values: dict[str, Any]
    best_metric: float | None
    best_config: Config | None
    metric: str
    mode: str


def columns(sweep: Sweep) -> list[str]:
    std = [f"{sweep.metric}_std"] if sweep.tune.cv_folds else []
    return ["trial", *sweep.keys, sweep.metric, *std, "steps", "status", "run_dir"]


def best_row(sweep: Sweep, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best trial by the metric: among the finished ones, else among all that have it."""
    scored = [r for r in rows if _finite(r.get(sweep.metric))]
    finished = [r for r in scored if r["status"] == FINISHED] or scored
    if not finished:
        return None
    pick = min if sweep.mode == "min" else max
    return pick(finished, key=lambda r: r[sweep.metric])


def sorted_rows(sweep: Sweep, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first; trials without the metric last, by name."""
    sign = 1 if sweep.mode == "min" else -1

    def key(r: dict[str, Any]) -> tuple:
        value = r.get(sweep.metric)
        return (0, sign * value, r["trial"]) if _finite(value) else (1, 0, r["trial"])

    return sorted(rows, key=key)


def write_outputs(sweep: Sweep, rows: list[dict[str, Any]], out: Path) -> TuneResult:
    """trials.csv, best.toml, tune.json and tune.png in the sweep's directory `out`."""
    names = columns(sweep)
    rows = sorted(rows, key=lambda r: r["trial"])
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=names, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in names})
    _write(out / TRIALS_FILE, text.getvalue())
    best = best_row(sweep, rows)
    config = None
    values: dict[str, Any] = {}
    if best is not None:
        values = {k: best[k] for k in sweep.keys}
        config = Config.from_dict(sweep.best_raw(values))
        header = (
            f"# raymb tune: the best trial, {best['trial']} ({sweep.metric} = "
            f"{best[sweep.metric]:.6g}); raymb train --config best.toml trains it again\n\n"
        )
        _write(out / BEST_FILE, header + to_toml(config))
    summary = {
        "metric": sweep.metric,
        "mode": sweep.mode,
        "best_trial": best["trial"] if best else None,
        "best_values": values,
        "best_metric": best[sweep.metric] if best else None,
        "best_run_dir": best["run_dir"] if best else None,
        "trials": len(rows),
        "finished": sum(r["status"] == FINISHED for r in rows),
        "stopped_early": sum(r["status"] == STOPPED_EARLY for r in rows),
        "failed": sum(str(r["status"]).startswith("failed") for r in rows),
    }
    _write(out / TUNE_FILE, json.dumps(summary, indent=2) + "\n")
    write_plot(sweep, rows, out / PLOT_FILE)
    return TuneResult(
        path=str(out),
        trials=rows,
        best_trial=summary["best_trial"],
        best_values=values,
        best_metric=summary["best_metric"],
        best_config=config,
        metric=sweep.metric,
        mode=sweep.mode,
    )


def format_table(sweep: Sweep, rows: list[dict[str, Any]]) -> str:
    """The trials sorted by the metric, best first, as a plain text table."""
    names = [c for c in columns(sweep) if c != "run_dir"]
    cells = [names] + [[_cell(r.get(c)) for c in names] for r in sorted_rows(sweep, rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(names))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)


def write_plot(sweep: Sweep, rows: list[dict[str, Any]], out: Path) -> Path | None:
    """tune.png: the metric against each searched key, one panel a key (no matplotlib: none)."""
    from raymb.rundir.plot import have_matplotlib

    scored = [r for r in rows if _finite(r.get(sweep.metric))]
    if not have_matplotlib() or not scored:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = sweep.keys
    fig = Figure(figsize=(4 * len(keys), 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    y = [r[sweep.metric] for r in scored]
    for ax, key in zip(axes, keys):
        x = [r[key] for r in scored]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in x)
        if not numeric:
            labels = sorted({str(v) for v in x})
            x = [labels.index(str(v)) for v in x]
            ax.set_xticks(range(len(labels)), labels)
        ax.scatter(x, y, color="C0")
        if numeric and min(x) > 0 and max(x) / min(x) > 100:
            ax.set_xscale("log")
        if min(y) > 0 and max(y) / min(y) > 100:
            ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(sweep.metric)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{sweep.config.run.name}: {len(scored)} trials")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _write(path: Path, text: str) -> None:
    """Replace `path` whole: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
