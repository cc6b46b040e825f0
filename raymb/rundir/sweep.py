"""What a sweep (`raymb tune`) leaves beside Ray Tune's experiment: sweep.json (what it
started with, compared on resume), trials.csv, best.toml, tune.json, tune.png, and the table
printed at the end. No Ray: the rows come from the driver (raymb.driver.tune), one dict per
trial; `finished_summary` is the trial's check that its run already trained to its end.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raymb.config import Config, to_toml
from raymb.config.tune import Sweep, TuneSection
from raymb.errors import ConfigError
from raymb.rundir.runs import STATUS_FILE, SUMMARY_FILE

TRIALS_FILE = "trials.csv"
BEST_FILE = "best.toml"
TUNE_FILE = "tune.json"
PLOT_FILE = "tune.png"
SWEEP_FILE = "sweep.json"
"""Written when a sweep starts: its space, the [tune] keys its trials depend on and its base
config; a resumed sweep must match it."""
TRIALS_DIR = "trials"
FINISHED = "finished"
STOPPED_EARLY = "stopped early"
INTERRUPTED = "interrupted"
"""trials.csv's status of a trial that Ctrl-C or SIGTERM stopped, and tune.json's of the sweep."""
NOT_STARTED = "not started"


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
    status: str = FINISHED
    """finished, or interrupted (Ctrl-C or SIGTERM: no best trial, no best.toml; running the
    same command again resumes the sweep)."""


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


def write_outputs(
    sweep: Sweep, rows: list[dict[str, Any]], out: Path, *, interrupted: bool = False
) -> TuneResult:
    """trials.csv, best.toml, tune.json and tune.png in the sweep's directory `out`. An
    interrupted sweep writes trials.csv and tune.json ("status": "interrupted", no best trial)
    only, and removes a best.toml an earlier end left: nothing reads as a finished sweep."""
    names = columns(sweep)
    rows = sorted(rows, key=lambda r: r["trial"])
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=names, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in names})
    _write(out / TRIALS_FILE, text.getvalue())
    best = None if interrupted else best_row(sweep, rows)
    if interrupted:
        (out / BEST_FILE).unlink(missing_ok=True)
        (out / PLOT_FILE).unlink(missing_ok=True)
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
        "status": INTERRUPTED if interrupted else FINISHED,
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
    if interrupted:
        summary["interrupted"] = sum(r["status"] == INTERRUPTED for r in rows)
        summary["not_started"] = sum(r["status"] == NOT_STARTED for r in rows)
    _write(out / TUNE_FILE, json.dumps(summary, indent=2) + "\n")
    if not interrupted:
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
        status=summary["status"],
    )


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary.json of a trial's (or a fold's) run that already trained to its end, or
    None. It did when status.json says finished or stopped early, or says running with a
    summary.json written after that mark: the sweep was killed between the run's summary and
    its last mark (a trial's fit has no Ctrl-C of its own to end it sooner)."""
    try:
        record = json.loads((run_dir / STATUS_FILE).read_text())
        summary_path = run_dir / SUMMARY_FILE
        written = summary_path.stat().st_mtime
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(summary, dict):
        return None
    status = record.get("status")
    if status == "running":
        marked = record.get("updated")
        if not isinstance(marked, int | float) or written < marked:
            return None  # an older attempt's summary: this one did not get that far
    elif status not in (FINISHED, STOPPED_EARLY):
        return None
    return summary


@contextlib.contextmanager
def removed_unless_started(sweep_dir: Path) -> Iterator[None]:
    """A new sweep (its folder missing or empty) that fails or is interrupted before any
    trial's run folder exists leaves its folder as it found it: what it wrote there (sweep.json,
    Ray's log, Tune's first files) would otherwise block its name, or be restored as a sweep.
    A sweep with a trial keeps everything: it is resumed from there."""
    existed = sweep_dir.exists()
    fresh = not existed or not any(sweep_dir.iterdir())
    try:
        yield
    except BaseException:
        trials = sweep_dir / TRIALS_DIR
        if fresh and not (trials.is_dir() and any(trials.iterdir())):
            shutil.rmtree(sweep_dir, ignore_errors=True)
            if existed:
                sweep_dir.mkdir(exist_ok=True)
        raise


def is_sweep_dir(path: Path) -> bool:
    """A folder a sweep started in: Ray Tune's tuner.pkl, or raymb's sweep.json."""
    return (path / "tuner.pkl").exists() or (path / SWEEP_FILE).exists()


_IGNORED_TUNE = ("space", "max_concurrent", "max_trials")
"""[tune] keys a resumed sweep may change: its trials do not depend on them."""
_IGNORED_SECTIONS = ("run", "log", "storage")
"""Sections a resumed sweep may change: the sweep's place (its name is the same), tracking,
the object store's endpoint."""


def sweep_record(sweep: Sweep) -> dict[str, Any]:
    """What sweep.json holds: the space as written, the [tune] keys (metric and mode
    resolved) and the base config (data paths absolute) its trials depend on."""
    tune = {
        name: getattr(sweep.tune, name)
        for name in TuneSection.__pydantic_fields__
        if name not in _IGNORED_TUNE
    }
    tune.update(metric=sweep.metric, mode=sweep.mode)
    config = {k: v for k, v in sweep.config.to_dict().items() if k not in _IGNORED_SECTIONS}
    data = dict(config.get("data", {}))
    for key in ("train", "val"):
        value = data.get(key)
        if isinstance(value, str) and value not in ("", "none") and "://" not in value:
            data[key] = os.path.abspath(os.path.expanduser(value))
    config["data"] = data
    record = {"format": "raymb-sweep", "space": sweep.tune.space, "tune": tune, "config": config}
    return json.loads(json.dumps(record))  # as it reads back


def write_record(sweep: Sweep, sweep_dir: Path) -> None:
    """sweep.json, when the sweep starts (a resumed sweep keeps the one it has)."""
    path = sweep_dir / SWEEP_FILE
    if not path.exists():
        sweep_dir.mkdir(parents=True, exist_ok=True)
        _write(path, json.dumps(sweep_record(sweep), indent=2) + "\n")


def check_record(sweep: Sweep, sweep_dir: Path) -> None:
    """A resumed sweep must be the one that started: the same space, [tune] keys and base
    config as its sweep.json, or a one-line ConfigError naming the first difference."""
    path = sweep_dir / SWEEP_FILE
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return  # a new sweep, or one from before sweep.json: nothing to compare
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{path}: not a readable sweep record ({e}); use another run.name"
        ) from None
    now = sweep_record(sweep)
    if not isinstance(saved, dict) or saved.get("format") != "raymb-sweep":
        raise ConfigError(f"{path}: not a raymb sweep record; use another run.name")
    old_flat = {
        **_flat_space(saved.get("space")),
        **_flat(saved.get("tune"), "tune"),
        **_flat(saved.get("config"), ""),
    }
    new_flat = {
        **_flat_space(now["space"]),
        **_flat(now["tune"], "tune"),
        **_flat(now["config"], ""),
    }
    for key in [*old_flat, *(k for k in new_flat if k not in old_flat)]:
        old, new = old_flat.get(key, _ABSENT), new_flat.get(key, _ABSENT)
        if old != new:
            raise ConfigError(
                f"{sweep_dir} is a sweep that started with {key} = {_shown(old)}, and the "
                f"config now has {_shown(new)}: a resumed sweep keeps the space and base config "
                "it started with; use another run.name for a changed sweep"
            )


_ABSENT = object()


def _shown(value: Any) -> str:
    return "(not set)" if value is _ABSENT else json.dumps(value)


def _flat_space(space: Any) -> dict[str, Any]:
    if not isinstance(space, dict):
        return {}
    return {f'tune.space."{k}"': v for k, v in space.items()}


def _flat(table: Any, prefix: str) -> dict[str, Any]:
    """Dotted keys of nested tables: {"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}."""
    if not isinstance(table, dict):
        return {prefix: table} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(_flat(value, name))
        else:
            flat[name] = value
    return flat


def format_table(sweep: Sweep, rows: list[dict[str, Any]]) -> str:
    """The trials sorted by the metric, best first, as a plain text table."""
    names = [c for c in columns(sweep) if c != "run_dir"]
    cells = [names] + [[_cell(r.get(c)) for c in names] for r in sorted_rows(sweep, rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(names))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)


def write_plot(sweep: Sweep, rows: list[dict[str, Any]], out: Path) -> Path | None:
    """tune.png: the metric against each searched key, one panel a key (no matplotlib: none)."""
    import importlib.util

    scored = [r for r in rows if _finite(r.get(sweep.metric))]
    if importlib.util.find_spec("matplotlib") is None or not scored:
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
