"""Startup: time from launching `raymb train` to its first step, against a minimal script.

Both are fresh processes that start their own local Ray (`python -m raymb.cli train
--config FILE` and bench/minimal_trainer.py), train the same mlp with 2 workers on the
same parquet data, and report after every step. The first step has happened when the
controller writes the first report: raymb's first metrics.csv row, the minimal script's
--first-step-file; the time is that file's mtime (or when it was seen) minus the launch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import ProcessPeaks, alternate, dataset, median, target

TARGET = 1.1
HERE = Path(__file__).resolve().parent
WORKERS, GLOBAL_BATCH, STEPS = 2, 64, 3


def run(quick: bool) -> dict:
    import ray

    if ray.is_initialized():
        raise RuntimeError("bench startup starts Ray in subprocesses: run it without a session")
    reps = 1 if quick else 3
    runs: dict[str, list[dict]] = {"minimal": [], "raymb": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = dataset(tmp / "data", 4096 if quick else 16_384, val_fraction=0)
        for rep, which in alternate(("minimal", "raymb"), reps):
            runs[which].append(_launch(which, data / "train", tmp / f"{which}-{rep}"))

    ratios = [r["first_step_s"] / m["first_step_s"] for r, m in zip(runs["raymb"], runs["minimal"])]
    rows = []
    for which, label in (("minimal", "minimal TorchTrainer script"), ("raymb", "raymb train")):
        rs = runs[which]
        rows.append(
            {
                "program": label,
                "first_step_s": median([r["first_step_s"] for r in rs]),
                "first_step_min_s": min(r["first_step_s"] for r in rs),
                "total_s": median([r["total_s"] for r in rs]),
                "driver_peak_rss_mb": max(r["driver_peak_rss_mb"] or 0 for r in rs),
                "worker_peak_rss_mb": max(r["worker_peak_rss_mb"] or 0 for r in rs),
            }
        )
    ratio = median(ratios)
    rows[1]["ratio"] = ratio
    return {
        "description": f"Seconds from launching the process to the first step's report: mlp, "
        f"{WORKERS} workers, G={GLOBAL_BATCH}, {STEPS} steps, a report every step; median "
        f"of {reps} alternating launches; ratio = median of raymb / minimal per pair.",
        "params": {"reps": reps, "workers": WORKERS, "global_batch": GLOBAL_BATCH},
        "columns": [
            ("program", "program"),
            ("first_step_s", "to first step (s)"),
            ("first_step_min_s", "fastest (s)"),
            ("ratio", "ratio raymb/minimal"),
            ("total_s", "whole run (s)"),
            ("driver_peak_rss_mb", "driver peak RSS (MiB)"),
            ("worker_peak_rss_mb", "worker peak RSS (MiB)"),
        ],
        "rows": rows,
        "ratios": ratios,
        "targets": [
            target("time to first step, raymb / minimal", ratio, f"<= {TARGET}", ratio <= TARGET)
        ],
        "notes": [
            "Whole run: to the process's exit; raymb also validates the config and data "
            "first and writes a checkpoint and summary.json at the end, the minimal script "
            "does neither.",
            "Driver peak RSS: the launched process itself; worker: the largest Ray Train "
            "worker process (sampled VmHWM).",
        ],
    }


def _launch(which: str, data: Path, work: Path) -> dict:
    """Run one program to its end; when its first step was reported, and its peak memory."""
    work.mkdir(parents=True)
    if which == "raymb":
        config = work / "bench.toml"
        config.write_text(
            f'[run]\nname = "startup"\nstorage_path = {json.dumps(str(work / "runs"))}\n'
            f"[data]\ntrain = {json.dumps(str(data))}\n"
            '[model]\nname = "mlp"\n'
            f"[train]\nglobal_batch_size = {GLOBAL_BATCH}\nmax_steps = {STEPS}\nlog_every = 1\n"
            f"[scale]\nworkers = {WORKERS}\n"
            '[checkpoint]\nmetric = "train_loss"\n'
        )
        command = [sys.executable, "-m", "raymb.cli", "train", "--config", str(config)]
        first = work / "runs" / "startup" / "metrics.csv"
        rows_before_first = 1  # the header
    else:
        first = work / "first_step"
        command = [
            sys.executable,
            str(HERE / "minimal_trainer.py"),
            *("--data", str(data), "--storage", str(work / "runs")),
            *("--first-step-file", str(first), "--workers", str(WORKERS)),
            *("--global-batch", str(GLOBAL_BATCH), "--steps", str(STEPS)),
        ]
        rows_before_first = 0
    log = open(work / "log.txt", "wb")
    launched = time.time()
    proc = subprocess.Popen(command, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    seen = None
    with ProcessPeaks(root=proc.pid) as peaks:
        while proc.poll() is None:
            if seen is None and first.exists():
                lines = first.read_text().splitlines()
                if len(lines) > rows_before_first:
                    seen = time.time()
                    # One row so far: the file's mtime is when it was written.
                    if len(lines) == rows_before_first + 1:
                        seen = min(seen, first.stat().st_mtime)
            time.sleep(0.01)
    ended = time.time()
    if seen is None and first.exists():  # it ran through between two looks: an upper bound
        seen = first.stat().st_mtime
    log.close()
    if proc.returncode != 0 or seen is None:
        tail = (work / "log.txt").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{which} exited {proc.returncode} before a first step:\n{tail}")
    return {
        "first_step_s": seen - launched,
        "total_s": ended - launched,
        "driver_peak_rss_mb": peaks.root_mb,
        "worker_peak_rss_mb": peaks.max_mb,
    }
