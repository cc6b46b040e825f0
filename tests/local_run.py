"""What the local tier (tests/local) trains with: raymb's numbers on the torch session, no Ray.

`train_local(config)` is `raymb.train` on raymb.driver.local.train_torch: the real epoch loop
(plan, steps, sync, validation, metrics.csv, checkpoints) on a plain gloo group of
scale.workers local processes (tests/integration/test_session_ray.py proves such a run equal
to Ray Train's). Its `summary` holds what summary.json would, from what the workers wrote:
the last checkpoint's progress (state.pt) and metrics.csv's last row.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raymb.config import Config
from raymb.driver.local import train_torch
from raymb.rundir.checkpoint import STATE_FILE, read


@dataclass(frozen=True)
class LocalRun:
    run_dir: Path
    checkpoint: str
    """The last checkpoint's model.pt, as raymb.train's result gives it."""
    summary: dict[str, Any]


def train_local(config: Config) -> LocalRun:
    """A run on the torch session, with what its summary.json would hold."""
    model_pt = train_torch(config)
    progress = read(model_pt.parent / STATE_FILE)["progress"]
    run_dir = model_pt.parent.parent
    with open(run_dir / "metrics.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]

    def number(key: str) -> float | None:
        return float(last[key]) if last.get(key) else None

    summary = {
        "val_loss": progress["val_loss"],
        "val_accuracy": progress["val_accuracy"],
        "val_perplexity": number("val_perplexity"),
        "val_bits_per_byte": number("val_bits_per_byte"),
        "steps": progress["step"],
        "samples": progress["samples"],
        "resumed_from_steps": progress["resumed_from_steps"],
        "bytes_allreduced": progress["bytes_allreduced"],
        "skipped_steps": progress["skipped_steps"],
        "stopped_early": progress["stopped_early"],
    }
    return LocalRun(run_dir=run_dir, checkpoint=str(model_pt), summary=summary)
