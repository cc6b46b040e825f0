"""docs/your-model.md's example runs as printed: examples/your_model's make_data.py, then
`raymb train --local --config config.toml` in a copy of the folder, no Ray (raymb imports
my_parts from the current folder). Two
epochs instead of the config's five (the test's only change, by --set) keep it short; the
run still ends with the custom metric's val_acc and val_wacc in metrics.csv."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "your_model"
RAYMB = Path(sys.executable).parent / "raymb"


def test_the_docs_example_runs_as_printed(tmp_path: Path) -> None:
    work = tmp_path / "your_model"
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns("data", "runs", "__pycache__"))
    env = dict(os.environ)
    subprocess.run([sys.executable, "make_data.py"], cwd=work, env=env, check=True)
    train = [str(RAYMB), "train", "--local", "--config", "config.toml", "--set", "train.epochs=2"]
    done = subprocess.run(train, cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "val_acc" in done.stderr + done.stdout
    with open(work / "runs" / "my-model" / "metrics.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert last["step"] == "64"  # 2 epochs of 2,000 rows in steps of 64: 32 a epoch
    # The label is learnable from both inputs: well above the majority class after 2 epochs.
    assert float(last["val_acc"]) > 0.8
    assert 0 < float(last["val_wacc"]) <= 1
