"""Scaling: samples/s of the mlp on 1, 2 and 4 workers, and what a step's all-reduce costs.

Weak scaling, as data parallelism is used: every worker keeps a microbatch of 256 rows
(G = 256·W, k = 1), and each run trains one epoch of the same data. The all-reduce's cost
per step is estimated twice: as the growth of the step time over the 1-worker run (which
has no DDP and no all-reduce), and by timing a gloo all-reduce of the same bytes alone.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.harness import alternate, dataset, median, ray_session, steady, train_run

MICROBATCH = 256


def run(quick: bool) -> dict:
    rows_n = 8_192 if quick else 200_000
    workers = (1, 2) if quick else (1, 2, 4)
    reps = 1 if quick else 2
    runs: dict[int, list[dict]] = {w: [] for w in workers}
    with tempfile.TemporaryDirectory() as tmp, ray_session():
        data = dataset(Path(tmp) / "data", rows_n, val_fraction=0)
        for rep, w in alternate(workers, reps):
            runs[w].append(
                train_run(
                    data,
                    Path(tmp) / "runs",
                    f"w{w}-r{rep}",
                    [
                        "model.name=mlp",
                        f"scale.workers={w}",
                        f"train.global_batch_size={MICROBATCH * w}",
                        "train.epochs=1",
                        f"train.log_every={5 if quick else 20}",
                    ],
                )
            )

    rows = []
    for w in workers:
        rs = runs[w]
        steps = rs[0]["summary"]["steps"]
        rows.append(
            {
                "workers": w,
                "global_batch": MICROBATCH * w,
                "steps": steps,
                "samples_per_s": median([r["steady_samples_per_s"] for r in rs]),
                "summary_samples_per_s": median([r["summary"]["samples_per_s"] for r in rs]),
                "step_time_ms": median([steady(r["metrics"], "step_time_s") for r in rs]) * 1e3,
                "data_wait_ms": median([steady(r["metrics"], "data_wait_s") for r in rs]) * 1e3,
                "bytes_per_step": rs[0]["summary"]["bytes_allreduced"] / steps,
                "worker_peak_rss_mb": max(r["worker_peak_rss_mb"] or 0 for r in rs),
                "wall_s": median([r["wall_s"] for r in rs]),
            }
        )
    one = rows[0]
    for row in rows:
        w = row["workers"]
        row["speedup"] = row["samples_per_s"] / one["samples_per_s"]
        row["efficiency"] = row["speedup"] / w
        row["allreduce_ms_from_step_time"] = (
            row["step_time_ms"] - one["step_time_ms"] if w > 1 else 0.0
        )
        row["allreduce_ms_gloo_alone"] = (
            _gloo_allreduce_s(w, int(row["bytes_per_step"]) // 4) * 1e3
            if w > 1 and not quick
            else None
        )
    cores = os.cpu_count() or 1
    return {
        "description": f"mlp (hidden [64, 64], 32 features, 3 classes), {rows_n:,} rows, one "
        f"epoch, {MICROBATCH} rows per worker per step (k=1), gloo; median of {reps} "
        "alternating runs. Steady samples/s: the median of metrics.csv's windows after the "
        "first; summary.json's also counts the first window's wait for Ray Data to start. "
        "Speed-up and efficiency use the steady figure.",
        "params": {"rows": rows_n, "microbatch": MICROBATCH, "reps": reps, "cores": cores},
        "columns": [
            ("workers", "workers"),
            ("global_batch", "G"),
            ("samples_per_s", "samples/s (steady)"),
            ("summary_samples_per_s", "samples/s (summary.json)"),
            ("speedup", "speed-up"),
            ("efficiency", "efficiency"),
            ("step_time_ms", "step (ms)"),
            ("data_wait_ms", "data wait (ms/step)"),
            ("bytes_per_step", "bytes all-reduced/step"),
            ("allreduce_ms_from_step_time", "all-reduce ms/step (step-time growth)"),
            ("allreduce_ms_gloo_alone", "all-reduce ms (gloo alone)"),
            ("worker_peak_rss_mb", "worker peak RSS (MiB)"),
        ],
        "rows": rows,
        "targets": [],
        "notes": [
            f"The ceiling: this machine has {cores} cores. The workers, Ray Data's read tasks, "
            "the Ray Train controller and gloo's all-reduce share them, so throughput can at "
            f"best grow {cores}x over one worker (efficiency <= {cores}/W: 1.0 at W=2, 0.5 at "
            "W=4), and less because one worker already has a second core's worth of help "
            "(reading, collation in prefetch threads) that more workers must share. Efficiency "
            "here measures the machine, not raymb; on W separate machines the ceiling is W.",
            "Peak RSS: the largest Ray Train worker process.",
        ],
    }


def _gloo_allreduce_s(world: int, numel: int, iters: int = 200) -> float:
    """Median seconds of one gloo all-reduce of `numel` float32 among `world` processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        out = Path(tmp) / "seconds"
        left = manager.Barrier(world)
        args = (world, port, numel, iters, str(out), left)
        mp.spawn(_allreduce_worker, args=args, nprocs=world)
        return float(out.read_text())


def _allreduce_worker(rank: int, world: int, port: int, numel: int, iters: int, out: str, left):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        tensor = torch.ones(max(numel, 1))
        times = []
        for i in range(iters + 20):
            started = time.perf_counter()
            dist.all_reduce(tensor)
            if i >= 20:
                times.append(time.perf_counter() - started)
        if rank == 0:
            Path(out).write_text(str(median(times)))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    left.wait(timeout=60)  # no rank exits while a peer is inside its teardown (bench/advice.py)
