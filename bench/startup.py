"""Startup: from launching `raymb train` to its first step, phase by phase, against a minimal
TorchTrainer script.

Every program is a fresh process (`python -m raymb.cli train --config FILE`,
bench/minimal_trainer.py) training the same mlp with 2 workers on the same parquet data (a
training and a validation set), with RAYMB_TIMELINE set (raymb.timeline): the driver
and the workers stamp each phase. Ray Train's own logs in the session directory add when its
controller started, when the worker group was up and how long the process group took.
Scenarios: a cold local run (raymb starts Ray), the same run resumed from its checkpoint,
and a run joining a head started here with `ray start --head` (`raymb train --address`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import ProcessPeaks, alternate, dataset, median, target

HERE = Path(__file__).resolve().parent
WORKERS, GLOBAL_BATCH, STEPS = 2, 64, 3
COLD_TARGET, CLUSTER_TARGET, RESUME_TARGET = 5.0, 2.0, 5.0
PHASES = (
    ("checks_s", "before Ray (imports, checks)"),
    ("ray_s", "Ray start"),
    ("reads_s", "reads"),
    ("controller_s", "to the Train controller"),
    ("worker_group_s", "worker group"),
    ("process_group_s", "of which process group"),
    ("loop_s", "loop to first step"),
)


def run(quick: bool) -> dict:
    import ray

    if ray.is_initialized():
        raise RuntimeError("bench startup starts Ray in subprocesses: run it without a session")
    reps = 1 if quick else 3
    runs: dict[str, list[dict]] = {k: [] for k in ("minimal", "raymb", "resumed", "cluster")}
    with tempfile.TemporaryDirectory(prefix="rmb-") as tmp:
        tmp = Path(tmp)
        data = dataset(tmp / "data", 4096, val_fraction=0.25)
        for rep, which in alternate(("minimal", "raymb"), reps):
            work = tmp / f"{which}-{rep}"
            runs[which].append(_launch(which, data, work))
            if which == "raymb":  # the same run again, three more steps: a resume
                runs["resumed"].append(_launch("raymb", data, work, steps=2 * STEPS))
        with _head(tmp / "head") as address:
            for rep in range(reps):
                runs["cluster"].append(_launch("raymb", data, tmp / f"c-{rep}", address=address))

    labels = {
        "minimal": "minimal TorchTrainer script, cold",
        "raymb": "raymb train, cold (local Ray)",
        "resumed": "raymb train, resumed from its checkpoint",
        "cluster": "raymb train --address (a running head)",
    }
    rows = []
    for which, label in labels.items():
        rs = runs[which]
        row = {"program": label}
        for key, _ in PHASES:
            values = [r[key] for r in rs if r.get(key) is not None]
            row[key] = median(values) if values else None
        row["first_step_s"] = median([r["first_step_s"] for r in rs])
        row["total_s"] = median([r["total_s"] for r in rs])
        row["driver_peak_rss_mb"] = max(r["driver_peak_rss_mb"] or 0 for r in rs)
        row["worker_peak_rss_mb"] = max(r["worker_peak_rss_mb"] or 0 for r in rs)
        rows.append(row)
    first = {row["program"]: row["first_step_s"] for row in rows}
    cold, resumed, joined = (first[labels[k]] for k in ("raymb", "resumed", "cluster"))
    ratio = cold / first[labels["minimal"]]
    rows[1]["ratio"] = ratio
    return {
        "description": f"Seconds from launching the process: mlp, {WORKERS} workers, "
        f"G={GLOBAL_BATCH}, {STEPS} steps (the resume: {STEPS} more), a report every step, "
        f"4,096 rows (1,024 of them validation); median of {reps} launches per scenario. "
        "Phases are consecutive; 'to first step' is their sum, from the launch.",
        "params": {"reps": reps, "workers": WORKERS, "global_batch": GLOBAL_BATCH},
        "columns": [
            ("program", "program"),
            *PHASES,
            ("first_step_s", "to first step (s)"),
            ("ratio", "raymb/minimal"),
            ("total_s", "launch to exit (s)"),
            ("driver_peak_rss_mb", "driver peak RSS (MiB)"),
            ("worker_peak_rss_mb", "worker peak RSS (MiB)"),
        ],
        "rows": rows,
        "runs": runs,
        "targets": [
            target("cold local run: to first step (s)", cold, f"<= {COLD_TARGET}", cold <= 5),
            target("resumed run: to first step (s)", resumed, f"<= {RESUME_TARGET}", resumed <= 5),
            target("running head: to first step (s)", joined, f"<= {CLUSTER_TARGET}", joined <= 2),
            target("cold: raymb / minimal script, to first step", ratio, "<= 1.1", ratio <= 1.1),
        ],
        "notes": [
            "Before Ray: the interpreter, raymb's imports and the config and data checks; Ray "
            "start: ray.init (or joining), with Ray Train, torch and the loop imported in a "
            "thread meanwhile; reads: submitting the read tasks of data.train and data.val, "
            "which run while Ray Train starts (the "
            "minimal script reads in its workers, inside its loop phase); to the controller: "
            "fit() until Ray Train's controller actor runs; worker group: its placement group, "
            "worker processes, train context and process group (Ray Train's logs); loop: the "
            "train function until its first optimizer step (imports, data fetch, model).",
            "The running head was started here (`ray start --head`, 3 CPUs, no dashboard) with "
            "RAYMB_TIMELINE in its environment, so that its workers stamp too.",
        ],
    }


def _config(work: Path, data: Path, steps: int) -> Path:
    config = work / "bench.toml"
    config.write_text(
        f'[run]\nname = "startup"\nstorage_path = {json.dumps(str(work / "runs"))}\n'
        f"[data]\ntrain = {json.dumps(str(data / 'train'))}\n"
        f"val = {json.dumps(str(data / 'val'))}\n"
        '[model]\nname = "mlp"\n'
        f"[train]\nglobal_batch_size = {GLOBAL_BATCH}\nmax_steps = {steps}\nlog_every = 1\n"
        f"[scale]\nworkers = {WORKERS}\n"
    )
    return config


def _launch(
    which: str, data: Path, work: Path, *, steps: int = STEPS, address: str | None = None
) -> dict:
    """Run one program to its end; its phases from the timeline and Ray Train's logs."""
    work.mkdir(parents=True, exist_ok=True)
    timeline = work / f"timeline-{steps}.jsonl"
    timeline.unlink(missing_ok=True)
    if which == "raymb":
        command = [sys.executable, "-m", "raymb.cli", "train", "--config"]
        command.append(str(_config(work, data, steps)))
        if address:
            command += ["--address", address]
    else:
        command = [
            sys.executable,
            str(HERE / "minimal_trainer.py"),
            *("--data", str(data / "train"), "--storage", str(work / "runs")),
            *("--first-step-file", str(work / "first_step"), "--workers", str(WORKERS)),
            *("--global-batch", str(GLOBAL_BATCH), "--steps", str(steps)),
        ]
    env = {**os.environ, "RAYMB_TIMELINE": str(timeline), "RAY_USAGE_STATS_ENABLED": "0"}
    if address:
        env["RAY_AUTH_MODE"] = "token"  # the head's token, in ~/.ray/auth_token
        env["RAYMB_TIMELINE"] = os.environ["RAYMB_BENCH_HEAD_TIMELINE"]
        timeline = Path(env["RAYMB_TIMELINE"])
        timeline.write_text("")  # the head's workers append to it: one launch at a time
    log = open(work / f"log-{steps}.txt", "wb")
    launched = time.time()
    proc = subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    with ProcessPeaks(root=proc.pid) as peaks:
        proc.wait()
    ended = time.time()
    log.close()
    events = _events(timeline)
    if proc.returncode != 0 or "first step" not in events:
        tail = (work / f"log-{steps}.txt").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{which} exited {proc.returncode} before a first step:\n{tail}")
    phases = _phases(events, launched)
    return {
        **phases,
        "total_s": ended - launched,
        "driver_peak_rss_mb": peaks.root_mb,
        "worker_peak_rss_mb": peaks.max_mb,
    }


def _events(timeline: Path) -> dict[str, dict]:
    """The first of each event (the workers': the last rank to reach it)."""
    events: dict[str, dict] = {}
    if not timeline.exists():
        return events
    for line in timeline.read_text().splitlines():
        e = json.loads(line)
        name = e["event"]
        if name not in events or ("rank" in e and e["t"] > events[name]["t"]):
            events[name] = e
    return events


def _phases(events: dict[str, dict], launched: float) -> dict:
    """Consecutive phases in seconds, from the timeline and Ray Train's logs."""
    t = {name: e["t"] for name, e in events.items()}
    train = _train_log(events["ray"].get("session_dir"), t["read"])
    marks = [
        ("checks_s", t.get("checked", t["ray"])),
        ("ray_s", t["ray"]),
        ("reads_s", t["read"]),
        ("controller_s", train.get("controller", t["loop"])),
        ("worker_group_s", train.get("started", t["loop"])),
        ("loop_s", t["first step"]),
    ]
    out, previous = {}, launched
    for key, mark in marks:
        out[key] = max(mark - previous, 0.0)
        previous = max(previous, mark)
    out["process_group_s"] = train.get("process_group")
    out["first_step_s"] = t["first step"] - launched
    return out


def _train_log(session_dir: str | None, after: float) -> dict[str, float]:
    """From Ray Train's JSON logs of this run (written after `after`): when the controller
    began, when the worker group was started, and the process group's set-up."""
    found: dict[str, float] = {}
    if not session_dir:
        return found
    setup, done = [], []
    for path in sorted(Path(session_dir, "logs", "train").glob("ray-train-sys-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            when, message = e.get("timestamp_ns", 0) / 1e9, e.get("message", "")
            if when < after:
                continue  # an earlier run on the same cluster
            if "controller" in path.name:
                found.setdefault("controller", when)
                if message.startswith("Started training worker group"):
                    found["started"] = when
            elif message.startswith("Setting up process group"):
                setup.append(when)
            elif message.startswith("Changing the working directory"):
                done.append(when)  # the next step of Ray Train's set-up
    if setup and done:
        found["process_group"] = max(done) - min(setup)
    return found


class _head:
    """`ray start --head --block` with its own ports and temp dir; stopped (its process group)
    at the end. Its processes inherit RAYMB_TIMELINE."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __enter__(self) -> str:
        self.root.mkdir(parents=True)
        timeline = self.root / "timeline.jsonl"
        os.environ["RAYMB_BENCH_HEAD_TIMELINE"] = str(timeline)
        ports = []
        for _ in range(5):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        gcs, client, agent, metrics, autoscaler = ports
        ray = Path(sys.executable).parent / "ray"
        env = {
            **os.environ,
            "RAYMB_TIMELINE": str(timeline),
            "DASHBOARD_METRIC_PORT": str(metrics),
            "AUTOSCALER_METRIC_PORT": str(autoscaler),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        command = [
            str(ray),
            *("start", "--head", "--block"),  # on the node's address: ray.init wants it
            *("--port", str(gcs), "--ray-client-server-port", str(client)),
            *("--dashboard-agent-listen-port", str(agent), "--include-dashboard", "false"),
            *("--num-cpus", "3", "--disable-usage-stats"),
            *("--min-worker-port", "0", "--max-worker-port", "0"),
            *("--temp-dir", str(self.root / "ray")),
        ]
        self.log = open(self.root / "head.log", "wb")
        self.proc = subprocess.Popen(
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        address = f"127.0.0.1:{gcs}"
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in (self.root / "head.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head failed: {self.root / 'head.log'}")
            time.sleep(0.5)
        return address

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()
        os.environ.pop("RAYMB_BENCH_HEAD_TIMELINE", None)
