"""What a user sees of a real `raymb train`: `python -m raymb.cli train` as its own process,
with its own local Ray cluster.

The default job (with a model factory that prints, in the workers) prints raymb's lines (its
messages, the progress lines, the result table) and the factory's own print, which reaches the
terminal from the workers: at most 2 other lines, counted on stdout and stderr (not a
terminal); Ray's lines are in <run dir>/logs/ray.log.

A driver SIGKILLed mid-run leaving none of its local cluster's processes (the watchdog,
raymb/driver/watchdog.py, which `raymb train` and `raymb tune` both start in
raymb.driver.cluster.connect) is tests/system/test_tune_resume.py's: its sweep is killed so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    (tmp_path / "printing_factory.py").write_text(FACTORY)
    args = ["--set", "model.name=printing_factory:make", "--set", "train.epochs=2"]
    proc = subprocess.run(
        [sys.executable, "-m", "raymb.cli", "train", *args],
        cwd=tmp_path,
        env=_env(tmp_path),
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
    # What the factory printed in the workers reached the terminal, on stdout.
    made = [line for line in lines if "printing_factory:" in line]
    assert made and all(line in proc.stdout.splitlines() for line in made), made
    assert any(line.startswith("(RayTrainWorker pid=") for line in made), made
    foreign = [
        line
        for line in lines
        if not line.startswith("raymb")
        and line not in table
        and line.split("  ")[0] not in keys
        and line not in made
    ]
    assert len(foreign) <= 2, "\n".join(foreign)
    steps = summary["steps"]
    assert any(line.startswith(f"raymb: step {steps}/{steps} ") for line in lines), proc.stderr
    log = (run_dir / RAY_LOG).read_text()
    for rays in ("Started a local Ray instance", "(TrainController pid=", "(RayTrainWorker pid="):
        assert rays in log
