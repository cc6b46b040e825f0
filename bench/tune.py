"""Tune: a sweep's wall time against the same runs launched one by one, and the per-trial
overhead.

`python -m raymb.cli tune` runs a grid of 4 learning rates (the linear model, 2 workers); the
baseline launches `python -m raymb.cli train --set optim.lr=...` 4 times, each starting its own
local Ray, as a shell loop would. Both are fresh processes; a sweep pays Ray's start once. The
per-trial overhead is each trial's wall time in Ray Tune (its result's time_total_s) minus its
training time (summary.json's samples / samples_per_s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import median, target

TARGET = 0.7
LRS = (0.01, 0.03, 0.1, 0.3)


def run(quick: bool) -> dict:
    import ray

    if ray.is_initialized():
        raise RuntimeError("bench tune starts Ray in subprocesses: run it without a session")
    from raymb.data.synthetic import generate

    rows_n, epochs = (1024, 1) if quick else (8192, 3)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate("linear", tmp / "data", rows=rows_n, shards=4, noise=0.1, seed=3)
        base = (
            f"[run]\nstorage_path = {json.dumps(str(tmp / 'runs'))}\n"
            f"[data]\ntrain = {json.dumps(str(tmp / 'data' / 'train'))}\n"
            f"val = {json.dumps(str(tmp / 'data' / 'val'))}\n"
            f"[train]\nepochs = {epochs}\nglobal_batch_size = 256\n[scale]\nworkers = 2\n"
        )
        (tmp / "one.toml").write_text('[run]\nname = "one"\n' + base.replace("[run]\n", ""))
        sweep = base.replace("[run]\n", '[run]\nname = "sweep"\n')
        sweep += f'[tune]\n[tune.space]\n"optim.lr" = {list(LRS)}\n'
        (tmp / "sweep.toml").write_text(sweep)
        started = time.perf_counter()
        _raymb(["tune", "--config", "sweep.toml"], tmp)
        sweep_s = time.perf_counter() - started
        one_by_one = []
        for i, lr in enumerate(LRS):
            started = time.perf_counter()
            _raymb(
                ["train", "--config", "one.toml", "--set", f"optim.lr={lr}"]
                + ["--set", f"run.name=one-{i}"],
                tmp,
            )
            one_by_one.append(time.perf_counter() - started)
        overheads = _overheads(tmp / "runs" / "sweep")
    ratio = sweep_s / sum(one_by_one)
    rows = [
        {"program": f"{len(LRS)} x raymb train, one by one", "wall_s": sum(one_by_one)},
        {
            "program": f"raymb tune, a grid of {len(LRS)}",
            "wall_s": sweep_s,
            "ratio": ratio,
            "trial_overhead_s": median(overheads) if overheads else None,
        },
    ]
    return {
        "description": f"Wall seconds of a grid of {len(LRS)} learning rates (linear model, "
        f"{rows_n} rows, {epochs} epochs, 2 workers): one `raymb tune` against {len(LRS)} "
        "`raymb train` launches one after another; ratio = sweep / one by one. Trial "
        "overhead: the median over trials of Tune's time_total_s minus the training time.",
        "params": {"rows": rows_n, "epochs": epochs, "trials": len(LRS)},
        "columns": [
            ("program", "program"),
            ("wall_s", "wall (s)"),
            ("ratio", "ratio sweep / one by one"),
            ("trial_overhead_s", "per-trial overhead (s)"),
        ],
        "rows": rows,
        "one_by_one_s": one_by_one,
        "trial_overheads_s": overheads,
        "targets": [
            target("sweep wall time / the runs one by one", ratio, f"<= {TARGET}", ratio <= TARGET)
        ],
        "notes": [
            "Per-trial overhead: the trial actor's start, raymb's checks, reading the data "
            "into the object store, Ray Train's controller and worker group, the closing "
            "sequence (summary.json, loss.png)."
        ],
    }


def _raymb(args: list[str], cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "raymb.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"raymb {' '.join(args)} failed: {proc.stderr[-2000:]}")


def _overheads(sweep_dir: Path) -> list[float]:
    found = []
    for tune_dir in sorted(sweep_dir.glob("tune-trial-*")):
        results = (tune_dir / "result.json").read_text().splitlines()
        if not results:
            continue
        total = json.loads(results[-1])["time_total_s"]
        summary = json.loads(
            (sweep_dir / "trials" / tune_dir.name[len("tune-") :] / "summary.json").read_text()
        )
        rate = summary.get("samples_per_s")
        trained = summary["samples"] / rate if rate else 0.0
        found.append(round(total - trained, 2))
    return found
