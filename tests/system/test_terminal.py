"""What a user sees of a real `raymb train`, and what it leaves running: each test runs
`python -m raymb.cli train` as its own process, with its own local Ray cluster.

- The default job prints raymb's lines (its messages, the progress lines, the result table):
  at most 2 others, counted on stdout and stderr (not a terminal); Ray's lines are in
  <run dir>/logs/ray.log.
- A driver SIGKILLed mid-training (a closed terminal, the OOM killer) leaves none of its
  cluster's processes 10 s later; what a custom model factory prints in the workers reached
  the terminal before.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raymb.driver.logs import RAY_LOG
from raymb.driver.report.summary import format_summary

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
FACTORY = """
import torch


def make(in_features, out_features):
    print(f"printing_factory: a {in_features} -> {out_features} linear model", flush=True)
    return torch.nn.Linear(in_features, out_features)
"""


def _env(*paths: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *map(str, paths)])
    return env


def test_the_default_job_prints_raymbs_lines_and_rays_go_to_its_log(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "raymb.cli", "train", "--set", "train.epochs=2"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=540,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "default"
    summary = json.loads((run_dir / "summary.json").read_text())
    table = format_summary(summary, run_dir).splitlines()
    keys = {line.split("  ")[0] for line in table}  # the run dir is shown as the CLI has it
    lines = proc.stdout.splitlines() + proc.stderr.splitlines()
    foreign = [
        line
        for line in lines
        if not line.startswith("raymb") and line not in table and line.split("  ")[0] not in keys
    ]
    assert len(foreign) <= 2, "\n".join(foreign)
    steps = summary["steps"]
    assert any(line.startswith(f"raymb: step {steps}/{steps} ") for line in lines), proc.stderr
    log = (run_dir / RAY_LOG).read_text()
    for rays in ("Started a local Ray instance", "(TrainController pid=", "(RayTrainWorker pid="):
        assert rays in log


def _descendants(pid: int) -> list:
    import psutil  # Ray's own copy, on the path once ray is imported

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def test_a_killed_driver_leaves_no_process_of_its_cluster(tmp_path):
    pytest.importorskip("ray")
    import psutil

    (tmp_path / "printing_factory.py").write_text(FACTORY)
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    args = ["--set", "model.name=printing_factory:make", "--set", "train.epochs=5000"]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        driver = subprocess.Popen(
            [sys.executable, "-m", "raymb.cli", "train", *args],
            cwd=tmp_path,
            env=_env(tmp_path),
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )
    metrics = tmp_path / "runs" / "default" / "metrics.csv"
    seen: dict[int, tuple] = {}
    try:
        deadline = time.monotonic() + 400
        # Training is under way: every process of the cluster is up.
        while not (metrics.exists() and len(metrics.read_text().splitlines()) > 2):
            assert driver.poll() is None, err.read_text()[-3000:]
            assert time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.5)
        for p in _descendants(driver.pid):
            try:
                seen[p.pid] = (p.create_time(), " ".join(p.cmdline())[:80])
            except psutil.Error:
                pass
        assert len(seen) > 5, seen  # GCS, raylet, agents, controller, workers, ...
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        killed = time.monotonic()
        while True:  # none left 10 s later (looked at each second, done once none is)
            left = []
            for pid, (created, cmd) in seen.items():
                try:
                    p = psutil.Process(pid)
                    if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                        left.append(cmd)
                except psutil.Error:
                    pass
            if not left or time.monotonic() - killed > 10:
                break
            time.sleep(1)
        assert left == [], left
        made = [line for line in out.read_text().splitlines() if "printing_factory:" in line]
        assert any(line.startswith("(RayTrainWorker pid=") for line in made), made
    finally:
        driver.kill()
        for pid, (created, _) in seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created:
                    p.kill()
            except psutil.Error:
                pass
