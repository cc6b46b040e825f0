"""Many epochs over data that fits in memory: `raymb train` against a hand-written DDP script.

Part 1: the programs launched as a user would (`python -m raymb.cli train --config FILE` on
Ray, the same with `--local`, and `torch.distributed.run` on bench/ddp_baseline.py), the same
mlp, Adam, G, seed and epochs on a 1,536-row, 64-feature, 10-class set, 2 workers (gloo):
wall time from launch to exit, time to the first step, and steady samples/s after the first
epoch.

Part 2: raymb's per-epoch overhead with its defaults (2 workers, G = 64) on a 1,024-row
set: (wall of N epochs - wall of N/9 epochs) / (extra epochs) - the steps' own compute;
and the throughput (samples over fit wall time) lost to a metrics row every step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import alternate, dataset, median, ray_session, target, train_run

HERE = Path(__file__).resolve().parent
WORKERS, GLOBAL_BATCH, LR = 2, 64, 0.001
STEADY_TARGET, WALL_TARGET, OVERHEAD_TARGET, LOG_TARGET = 0.95, 2.0, 0.1, 0.05
LOCAL_WALL_TARGET, LOCAL_STEADY_TARGET = 1.3, 0.97
"""raymb train --local against the script (issue 37)."""


def run(quick: bool) -> dict:
    import ray

    if ray.is_initialized():
        raise RuntimeError("bench epochs starts Ray in subprocesses: run it without a session")
    epochs, reps = (3, 1) if quick else (20, 2)
    runs: dict[str, list[dict]] = {"ddp": [], "raymb": [], "local": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = dataset(tmp / "data", 1536, features=64, classes=10, shards=4, val_fraction=0)
        for rep, which in alternate(("ddp", "raymb", "local"), reps):
            runs[which].append(_launch(which, data / "train", tmp / f"{which}-{rep}", epochs))
        overhead = _overhead(tmp, quick)

    rows = []
    programs = (
        ("ddp", "hand-written DDP script"),
        ("raymb", "raymb train"),
        ("local", "raymb train --local"),
    )
    for which, label in programs:
        rs = runs[which]
        rows.append(
            {
                "program": label,
                "wall_s": median([r["wall_s"] for r in rs]),
                "first_step_s": median([r["first_step_s"] for r in rs]),
                "steady_samples_per_s": median([r["steady"] for r in rs]),
            }
        )
    ratio = rows[1]["steady_samples_per_s"] / rows[0]["steady_samples_per_s"]
    rows[1]["steady_ratio"] = ratio
    wall_ratio = rows[1]["wall_s"] / rows[0]["wall_s"]
    rows[1]["wall_ratio"] = wall_ratio
    local_steady = rows[2]["steady_samples_per_s"] / rows[0]["steady_samples_per_s"]
    local_wall = rows[2]["wall_s"] / rows[0]["wall_s"]
    rows[2]["steady_ratio"], rows[2]["wall_ratio"] = local_steady, local_wall
    rows.append({"program": "raymb per-epoch overhead (s)", "overhead_s": overhead["per_epoch"]})
    rows.append(
        {
            "program": "raymb: throughput lost to log_every = 1 (vs 1000)",
            "overhead_s": overhead["log_every_1_cost"],
        }
    )
    return {
        "description": f"{epochs} epochs of an mlp [64, 64] with Adam (lr {LR}), "
        f"{WORKERS} gloo workers, G={GLOBAL_BATCH}, on 1,536 rows x 64 features, 10 classes; "
        f"median of {reps} alternating launches. Steady samples/s: after the first epoch. "
        "Per-epoch overhead: raymb's defaults on 1,024 rows, "
        f"{overhead['epochs']} against {overhead['short_epochs']} epochs.",
        "params": {"epochs": epochs, "reps": reps, **overhead},
        "columns": [
            ("program", "program"),
            ("wall_s", "launch to exit (s)"),
            ("first_step_s", "to first step (s)"),
            ("steady_samples_per_s", "steady samples/s"),
            ("wall_ratio", "launch to exit raymb/DDP"),
            ("steady_ratio", "steady raymb/DDP"),
            ("overhead_s", "value"),
        ],
        "rows": rows,
        "runs": runs,
        "targets": [
            target(
                "launch to exit, raymb / DDP script",
                wall_ratio,
                f"<= {WALL_TARGET}",
                wall_ratio <= WALL_TARGET,
            ),
            target(
                "steady samples/s, raymb / DDP script",
                ratio,
                f">= {STEADY_TARGET}",
                ratio >= STEADY_TARGET,
            ),
            target(
                "launch to exit, raymb --local / DDP script",
                local_wall,
                f"<= {LOCAL_WALL_TARGET}",
                local_wall <= LOCAL_WALL_TARGET,
            ),
            target(
                "steady samples/s, raymb --local / DDP script",
                local_steady,
                f">= {LOCAL_STEADY_TARGET}",
                local_steady >= LOCAL_STEADY_TARGET,
            ),
            target(
                "per-epoch overhead (s), 2 workers, 1,024 rows",
                overhead["per_epoch"],
                f"<= {OVERHEAD_TARGET}",
                overhead["per_epoch"] <= OVERHEAD_TARGET,
            ),
            target(
                "log_every = 1: share of throughput lost (samples / fit wall time)",
                overhead["log_every_1_cost"],
                f"<= {LOG_TARGET}",
                overhead["log_every_1_cost"] <= LOG_TARGET,
            ),
        ],
        "notes": [
            "raymb also checks the config and data before Ray starts, checkpoints (the last "
            "step, and epoch ends at least checkpoint.min_interval_s apart) and writes "
            "metrics.csv, summary.json and loss.png; the script does none of that.",
            "All start their processes from nothing: raymb a local Ray cluster, raymb --local "
            "two spawned processes in a gloo group (no Ray), the script torch.distributed.run's "
            "two processes.",
        ],
    }


def _launch(which: str, data: Path, work: Path, epochs: int) -> dict:
    """Run one program to its end: wall time, first step, steady samples/s."""
    work.mkdir(parents=True)
    times = work / "times.jsonl"
    if which in ("raymb", "local"):
        config = work / "bench.toml"
        config.write_text(
            f'[run]\nname = "epochs"\nstorage_path = {json.dumps(str(work / "runs"))}\n'
            f"[data]\ntrain = {json.dumps(str(data))}\n"
            '[model]\nname = "mlp"\nhidden = [64, 64]\n'
            f'[optim]\nname = "adam"\nlr = {LR}\n'
            f"[train]\nglobal_batch_size = {GLOBAL_BATCH}\nepochs = {epochs}\n"
            f"[scale]\nworkers = {WORKERS}\n"
            '[checkpoint]\nmetric = "train_loss"\n'
        )
        command = [sys.executable, "-m", "raymb.cli", "train", "--config", str(config)]
        if which == "local":
            command.append("--local")
    else:
        command = [
            *(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORKERS)),
            *("--master-port", "29517", str(HERE / "ddp_baseline.py"), "--data", str(data)),
            *("--times", str(times), "--epochs", str(epochs)),
            *("--global-batch", str(GLOBAL_BATCH), "--lr", str(LR)),
        ]
    first_row = work / "runs" / "epochs" / "metrics.csv"
    launched = time.time()
    seen = None
    with open(work / "log.txt", "wb") as log:
        proc = subprocess.Popen(command, cwd=work, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if seen is None and which != "ddp" and first_row.exists():
                seen = time.time()  # the first gather writes the first row after step 1
            time.sleep(0.02)
    wall = time.time() - launched
    if proc.returncode != 0:
        raise RuntimeError(f"{which} exited {proc.returncode}; see {work / 'log.txt'}")
    if which != "ddp":
        return {"wall_s": wall, "first_step_s": seen - launched, "steady": _steady(first_row)}
    first, steady = _script_times(times, launched)
    return {"wall_s": wall, "first_step_s": first, "steady": steady}


def _steady(metrics: Path) -> float:
    """Samples/s over the metrics rows after the first epoch (their windows' wall time)."""
    import csv

    samples = seconds = 0.0
    previous = None
    for row in csv.DictReader(open(metrics, newline="")):
        now = float(row["samples"])
        if previous is not None and int(row["epoch"]) >= 1:
            samples += now - previous
            seconds += (now - previous) / float(row["samples_per_s"])
        previous = now
    return samples / seconds if seconds else float("nan")


def _script_times(times: Path, launched: float) -> tuple[float, float]:
    lines = [json.loads(line) for line in times.read_text().splitlines()]
    first = next(e["t"] for e in lines if e.get("first_step")) - launched
    epochs = [e for e in lines if "epoch" in e]
    one, last = epochs[0], epochs[-1]
    steady = (last["samples"] - one["samples"]) / (last["t"] - one["t"])
    return first, steady


def _overhead(tmp: Path, quick: bool) -> dict:
    """raymb's defaults (2 workers, G = 64, linear model) on 1,024 rows: seconds per epoch
    beyond its steps' compute, from a long and a short run in one Ray session."""
    from raymb.data.synthetic import generate

    long, short = (9, 1) if quick else (18, 2)
    data = tmp / "linear"
    generate("linear", data, rows=1024 + 256, shards=4, seed=1)
    walls: dict[int, list[float]] = {long: [], short: []}
    compute: dict[int, list[float]] = {long: [], short: []}
    logged: dict[int, list[float]] = {1: [], 1000: []}
    with ray_session():
        for rep, epochs in alternate((short, long), 1 if quick else 2):
            result = train_run(data, tmp / "runs", f"e{epochs}-{rep}", [f"train.epochs={epochs}"])
            walls[epochs].append(result["summary"]["wall_s"])
            compute[epochs].append(_step_seconds(result["metrics"]))
        # A metrics row every step against one every 1000: what log_every = 1 costs.
        for rep, every in alternate((1, 1000), 1 if quick else 2):
            result = train_run(
                data,
                tmp / "runs",
                f"log{every}-{rep}",
                [f"train.epochs={long}", f"train.log_every={every}"],
            )
            summary = result["summary"]
            logged[every].append(summary["samples"] / summary["wall_s"])
    extra = long - short
    wall = median(walls[long]) - median(walls[short])
    steps = median(compute[long]) - median(compute[short])
    return {
        "epochs": long,
        "short_epochs": short,
        "per_epoch": (wall - steps) / extra,
        "wall_long_s": median(walls[long]),
        "wall_short_s": median(walls[short]),
        "log_every_1_cost": 1 - median(logged[1]) / median(logged[1000]),
    }


def _step_seconds(metrics: list[dict]) -> float:
    """Seconds the steps themselves took (forward, backward, optimizer), from metrics.csv."""
    total, previous = 0.0, 0
    for row in metrics:
        total += row["step_time_s"] * (row["step"] - previous)
        previous = row["step"]
    return total
