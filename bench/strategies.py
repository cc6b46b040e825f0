"""Synchronisation strategies (issue 3): grad vs param (local SGD) vs diloco.

The same classification data, the same mlp, the same samples (epochs) and 2 workers for
each: train.sync = grad, param with train.average_every H in {1, 4, 16}, and diloco with
H in {16, 64} (outer SGD, Nesterov, lr 0.7, momentum 0.9: the defaults of [outer]). The
steps of an epoch are a multiple of 64, so every epoch's end (a checkpoint, where param
and diloco average mid-period) falls on an averaging step and adds no extra all-reduce.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.harness import alternate, dataset, median, ray_session, target, train_run

LOSS_TOLERANCE = 0.02
BYTES_FACTOR = 16
STRATEGIES = {
    "grad": ["train.sync=grad"],
    "param H=1": ["train.sync=param", "train.average_every=1"],
    "param H=4": ["train.sync=param", "train.average_every=4"],
    "param H=16": ["train.sync=param", "train.average_every=16"],
    "diloco H=16": ["train.sync=diloco", "train.average_every=16"],
    "diloco H=64": ["train.sync=diloco", "train.average_every=64"],
}
QUICK = {
    "grad": ["train.sync=grad"],
    "param H=4": ["train.sync=param", "train.average_every=4"],
    "diloco H=4": ["train.sync=diloco", "train.average_every=4"],
}


def run(quick: bool) -> dict:
    workers, G = 2, 256
    steps_per_epoch = 8 if quick else 384
    epochs = 1 if quick else 2
    rows_n = steps_per_epoch * G
    reps = 1
    strategies = QUICK if quick else STRATEGIES
    runs: dict[str, list[dict]] = {name: [] for name in strategies}
    with tempfile.TemporaryDirectory() as tmp, ray_session():
        data = dataset(
            Path(tmp) / "data", rows_n, classes=10, noise=0.5, val_fraction=0.1, shards=8
        )
        for rep, name in alternate(list(strategies), reps):
            runs[name].append(
                train_run(
                    data,
                    Path(tmp) / "runs",
                    f"{name.replace(' ', '-').replace('=', '')}-r{rep}",
                    [
                        "model.name=mlp",
                        f"scale.workers={workers}",
                        f"train.global_batch_size={G}",
                        f"train.epochs={epochs}",
                        "train.log_every=32",
                        *strategies[name],
                    ],
                )
            )

    rows = []
    for name in strategies:
        rs = runs[name]
        s = rs[0]["summary"]
        rows.append(
            {
                "strategy": name,
                "val_loss": median([r["summary"]["val_loss"] for r in rs]),
                "val_accuracy": median([r["summary"]["val_accuracy"] for r in rs]),
                "steps": s["steps"],
                "samples": s["samples"],
                "bytes_allreduced": s["bytes_allreduced"],
                "wall_s": median([r["summary"]["wall_s"] for r in rs]),
                "samples_per_s": median([r["summary"]["samples_per_s"] for r in rs]),
                "worker_peak_rss_mb": max(r["worker_peak_rss_mb"] or 0 for r in rs),
            }
        )
    grad = rows[0]
    for row in rows:
        row["val_loss_vs_grad"] = row["val_loss"] / grad["val_loss"] - 1
        row["bytes_vs_grad"] = (
            grad["bytes_allreduced"] / row["bytes_allreduced"] if row["bytes_allreduced"] else None
        )
    targets = []
    h16 = next((row for row in rows if row["strategy"] == "param H=16"), None)
    if h16 is not None:
        targets = [
            target(
                "param H=16: final val loss vs grad",
                h16["val_loss_vs_grad"],
                f"<= +{LOSS_TOLERANCE:.0%} (not worse than grad by more)",
                h16["val_loss_vs_grad"] <= LOSS_TOLERANCE,
            ),
            target(
                "param H=16: grad's bytes / param's bytes",
                h16["bytes_vs_grad"],
                f">= {BYTES_FACTOR}",
                h16["bytes_vs_grad"] is not None and h16["bytes_vs_grad"] >= BYTES_FACTOR,
            ),
        ]
    return {
        "description": f"mlp [64, 64], {rows_n:,} rows x 32 features, 10 classes (noise 0.5), "
        f"{epochs} epochs of {steps_per_epoch} steps, G={G} on {workers} workers, SGD lr 0.05 "
        "momentum 0.9 (per-worker optimizer state for param and diloco); one run each, in "
        "alternating order. Bytes: summary.json's bytes_allreduced (per worker, total).",
        "params": {"rows": rows_n, "global_batch": G, "workers": workers, "epochs": epochs},
        "columns": [
            ("strategy", "train.sync"),
            ("val_loss", "final val loss"),
            ("val_loss_vs_grad", "vs grad"),
            ("val_accuracy", "val accuracy"),
            ("bytes_allreduced", "bytes all-reduced"),
            ("bytes_vs_grad", "grad's bytes / this"),
            ("wall_s", "wall (s)"),
            ("samples_per_s", "samples/s"),
            ("worker_peak_rss_mb", "worker peak RSS (MiB)"),
        ],
        "rows": rows,
        "targets": targets,
        "notes": [
            "Wall time includes each run's start-up (Ray Train worker group, Ray Data), about "
            "the same for every strategy; samples/s is over the training time only.",
        ],
    }
