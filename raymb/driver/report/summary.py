"""The result table: what `raymb train` and a job print at the end, from summary.json
(the progress while it runs is raymb.driver.report.progress's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raymb.core.noise import batch_advice
from raymb.driver.report.progress import duration, number


def format_summary(summary: dict[str, Any], run_dir: str | Path) -> str:
    """summary.json as a short two-column table, for the end of `raymb train` and of a job."""
    resumed = summary.get("resumed_from_steps") or []
    steps = f"{summary.get('steps', 0):,}"
    notes = [f"resumed from step {', '.join(str(s) for s in resumed)}"] if resumed else []
    if summary.get("stopped_early"):
        notes.append("stopped early")
    if summary.get("skipped_steps"):
        notes.append(f"{summary['skipped_steps']:,} skipped")
    if notes:
        steps += f" ({'; '.join(notes)})"
    rate = summary.get("samples_per_s")
    rows = [
        ("train loss", number(summary.get("train_loss"))),
        ("val loss", number(summary.get("val_loss"))),
        ("val accuracy", number(summary.get("val_accuracy"), ".4f")),
        *(
            [("val perplexity", number(summary["val_perplexity"], ".3f"))]
            if summary.get("val_perplexity") is not None  # language models
            else []
        ),
        *(
            [("val bits/byte", number(summary["val_bits_per_byte"], ".4f"))]
            if summary.get("val_bits_per_byte") is not None
            else []
        ),
        ("steps", steps),
        ("samples", f"{summary.get('samples', 0):,}"),
        *(
            [("files", f"{summary['files_consumed']:,} ({summary.get('stop_reason') or 'done'})")]
            if "files_consumed" in summary  # online training
            else []
        ),
        ("samples/s", "n/a" if rate is None else f"{rate:,.1f}"),
        ("wall time", duration(summary["wall_s"]) if summary.get("wall_s") is not None else "n/a"),
        ("all-reduced", f"{size(summary.get('bytes_allreduced') or 0)} per worker"),
        *_noise_rows(summary),
        ("checkpoint", str(summary.get("checkpoint") or "none")),
        *(
            [("best", str(summary["best_checkpoint"]))]
            if summary.get("best_checkpoint") not in (None, summary.get("checkpoint"))
            else []
        ),
        ("run dir", str(run_dir)),
    ]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def _noise_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """train.noise_scale: the last estimate, and a line when G is far from it."""
    if "grad_noise_scale" not in summary:
        return []
    estimate = summary["grad_noise_scale"]
    if estimate is None:
        return [("noise scale", "n/a (no step with two batch sizes yet)")]
    rows = [("noise scale", f"{estimate:,.1f} rows (B_simple, the last estimate)")]
    advice = batch_advice(estimate, summary.get("global_batch_size"))
    return rows + ([("", advice)] if advice else [])


def size(n: float) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 3.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
