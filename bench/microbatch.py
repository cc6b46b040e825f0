"""Microbatching: the same global batch G split into k = 1, 4, 16 microbatches per worker.

Gradient accumulation trades activation memory for smaller matrix products: memory should
fall with k and throughput stay within 10%. Activations only matter when they are large
next to a worker's ~0.5 GiB of torch and Ray, so this uses a wide mlp (hidden [1024, 1024])
and a large G; at raymb's default mlp ([64, 64]) and G they are under a MiB either way.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.harness import alternate, dataset, median, ray_session, steady, target, train_run

THROUGHPUT_TOLERANCE = 0.10


def run(quick: bool) -> dict:
    rows_n, G, hidden = (4_096, 1_024, 256) if quick else (65_536, 8_192, 1024)
    ks = (1, 4) if quick else (1, 4, 16)
    reps = 1 if quick else 2
    workers = 2
    runs: dict[int, list[dict]] = {k: [] for k in ks}
    with tempfile.TemporaryDirectory() as tmp, ray_session():
        data = dataset(Path(tmp) / "data", rows_n, val_fraction=0)
        for rep, k in alternate(ks, reps):
            runs[k].append(
                train_run(
                    data,
                    Path(tmp) / "runs",
                    f"k{k}-r{rep}",
                    [
                        "model.name=mlp",
                        f"model.hidden=[{hidden}, {hidden}]",
                        f"scale.workers={workers}",
                        f"train.global_batch_size={G}",
                        f"train.microbatch_size={G // (workers * k)}",
                        "train.epochs=1",
                        "train.log_every=2",
                    ],
                )
            )

    rows = []
    for k in ks:
        rs = runs[k]
        m = G // (workers * k)
        rows.append(
            {
                "k": k,
                "microbatch": m,
                "samples_per_s": median([r["steady_samples_per_s"] for r in rs]),
                "summary_samples_per_s": median([r["summary"]["samples_per_s"] for r in rs]),
                "step_time_s": median([steady(r["metrics"], "step_time_s") for r in rs]),
                "worker_peak_rss_mb": median([r["worker_peak_rss_mb"] for r in rs]),
                # Forward activations kept for backward: 2 hidden layers x (Linear out, ReLU
                # out) float32, plus the input and logits; backward needs about as much again.
                "activations_mib": m * (4 * hidden + 32 + 3) * 4 / 2**20,
                "final_train_loss": median([r["summary"]["train_loss"] for r in rs]),
            }
        )
    base = rows[0]
    for row in rows:
        row["throughput_vs_k1"] = row["samples_per_s"] / base["samples_per_s"]
        row["memory_vs_k1_mib"] = row["worker_peak_rss_mb"] - base["worker_peak_rss_mb"]
    worst = min(row["throughput_vs_k1"] for row in rows)
    falls = all(a["worker_peak_rss_mb"] > b["worker_peak_rss_mb"] for a, b in zip(rows, rows[1:]))
    return {
        "description": f"mlp hidden [{hidden}, {hidden}], 32 features, {rows_n:,} rows, one "
        f"epoch, G={G} on {workers} workers, m = G/(W·k); median of {reps} alternating runs. "
        "Peak RSS: the largest Ray Train worker (VmHWM sampled while it runs). Steady "
        "samples/s: median of metrics.csv's windows after the first.",
        "params": {"rows": rows_n, "global_batch": G, "hidden": hidden, "workers": workers},
        "columns": [
            ("k", "k"),
            ("microbatch", "m"),
            ("samples_per_s", "samples/s (steady)"),
            ("summary_samples_per_s", "samples/s (summary.json)"),
            ("throughput_vs_k1", "vs k=1"),
            ("step_time_s", "step (s)"),
            ("worker_peak_rss_mb", "worker peak RSS (MiB)"),
            ("memory_vs_k1_mib", "vs k=1 (MiB)"),
            ("activations_mib", "forward activations (MiB, computed)"),
            ("final_train_loss", "last train loss"),
        ],
        "rows": rows,
        "targets": [
            target(
                "lowest throughput vs k=1",
                worst,
                f">= {1 - THROUGHPUT_TOLERANCE:.2f}",
                worst >= 1 - THROUGHPUT_TOLERANCE,
            ),
            target("peak memory falls as k grows", falls, "yes", falls),
        ],
        "notes": [
            "The last train loss is the same up to float rounding for every k: the step's "
            "gradient is the mean over the same G samples whatever the split.",
        ],
    }
