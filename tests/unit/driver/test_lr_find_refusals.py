"""`raymb lr-find` loses nothing and hangs nothing (issue 34): the battery of its refusals, each a
new `raymb` process (assert_refused: exit 2, one line, nothing written, under 2 s, no Ray), and
on the plain torch.distributed path (no Ray) what it keeps and what it clears.

- It clears `<run.name>-lr-find/` only when that is provably an lr-find's output: its
  lr_find.json, or (an lr-find from before the marker) nothing but what lr-find writes, its
  lr_find.csv with lr-find's header. Anything else is refused, naming the folder and what it
  holds.
- A second lr-find of the same name is refused, naming the first's host and pid.
- --steps is bounded and --min/--max are positive, finite, min < max, before anything is built.
- Ctrl-C stops the test at the next step: one line, exit 130, the curve so far kept and the
  folder marked "interrupted", its lock and STOP file gone.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_refused, tree

from raymb import load_config
from raymb.core.lr_find import CSV_COLUMNS, MAX_STEPS
from raymb.driver.lr_find import lr_find
from raymb.rundir.lr_find_folder import MARKER_FILE

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[3]
HEADER = ",".join(CSV_COLUMNS) + "\n1,1e-07,0.5,0.5\n"


def _args(tmp_path: Path, *extra: str) -> list[str]:
    # data.train is never read: every refusal here comes before the data checks.
    sets = [f"run.storage_path={tmp_path / 'runs'}", "run.name=exp", "data.train=nowhere"]
    return ["lr-find", *(a for s in sets for a in ("--set", s)), *extra]


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


MARKED = {MARKER_FILE: json.dumps({"raymb": "lr-find", "status": "finished"})}

# A folder named <run.name>-lr-find that lr-find must not clear, and the words its refusal names.
FOREIGN = {
    "a run copied there": (
        {"run.json": "{}", "summary.json": "{}", "metrics.csv": "step\n", "status.json": "{}"},
        ["metrics.csv", "run.json"],
    ),
    "a run's checkpoint": ({"checkpoint_00000010/model.pt": "weights"}, ["checkpoint_00000010"]),
    "a marked folder that took a run's files": (
        {**MARKED, "lr_find.csv": HEADER, "summary.json": "{}"},
        ["summary.json"],
    ),
    "a marker that is not an lr-find's": (
        {MARKER_FILE: json.dumps({"raymb": "train"})},
        [f"its {MARKER_FILE} is not an lr-find's"],
    ),
    "a marker that is not JSON": ({MARKER_FILE: "hello"}, [f"its {MARKER_FILE}"]),
    "a curve without lr-find's header": (
        {"lr_find.csv": "epoch,loss\n1,2\n"},
        ["its lr_find.csv is not an lr-find's curve"],
    ),
    "logs/ holding more than ray.log": (
        {"logs/ray.log": "ray\n", "logs/notes.txt": "mine\n", "lr_find.csv": HEADER},
        ["logs"],
    ),
    "a stranger's file": ({"lr_find.csv": HEADER, "notes.txt": "mine"}, ["notes.txt"]),
}


@pytest.mark.parametrize("case", list(FOREIGN), ids=list(FOREIGN))
def test_a_folder_that_is_not_an_lr_finds_is_refused(tmp_path, case):
    files, words = FOREIGN[case]
    folder = tmp_path / "runs" / "exp-lr-find"
    _write(folder, files)
    assert_refused(
        _args(tmp_path),
        tmp_path,
        f"{folder}: not an lr-find's output folder",
        *words,
        "move it away or choose another run.name",
    )


def test_a_link_in_the_folder_is_not_an_lr_finds(tmp_path):
    """A link named as lr-find's file points at something that is not the folder's."""
    run = tmp_path / "runs" / "exp"
    _write(run, {"summary.json": "{}"})
    folder = tmp_path / "runs" / "exp-lr-find"
    folder.mkdir()
    (folder / "lr_find.png").symlink_to(run / "summary.json")
    assert_refused(_args(tmp_path), tmp_path, "lr_find.png", "not an lr-find's output folder")


def test_a_second_lr_find_is_refused_naming_the_first(tmp_path):
    folder = tmp_path / "runs" / "exp-lr-find"
    _write(folder, {**MARKED, "lr_find.csv": HEADER, "logs/ray.log": "ray\n"})
    # The first lr-find's lock: a live process of this host (this test's own).
    host, pid = socket.gethostname(), os.getpid()
    lock = {"host": host, "pid": pid, "started": time.time(), "token": "0123456789abcdef"}
    (folder / ".lock").write_text(json.dumps(lock) + "\n")
    assert_refused(
        _args(tmp_path), tmp_path, "in use by another raymb driver", f"host {host}", f"pid {pid}"
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--steps", "1e9"], ["--steps 1e9", f"at most {MAX_STEPS:,}"]),
        (["--steps", "1000000000"], ["--steps 1000000000", f"at most {MAX_STEPS:,}"]),
        (["--steps", str(MAX_STEPS + 1)], [f"at most {MAX_STEPS:,}"]),
        (["--steps", "1e400"], ["--steps 1e400", "whole number"]),
        (["--steps", "2.5"], ["--steps 2.5", "whole number"]),
        (["--steps", "many"], ["--steps many", "whole number"]),
        (["--min", "0"], ["--min 0", "positive, finite"]),
        (["--min=-1e-3"], ["--min -1e-3", "positive, finite"]),
        (["--max", "inf"], ["--max inf", "positive, finite"]),
        (["--min", "nan"], ["--min nan", "positive, finite"]),
        (["--max", "ten"], ["--max ten", "expected a number"]),
        (["--min", "1e-300", "--max", "1e300"], ["too wide"]),
    ],
)
def test_steps_and_rates_are_bounded_before_anything_is_built(tmp_path, args, words):
    assert_refused(_args(tmp_path, *args), tmp_path, *words)


# ------------------------------------------------- on local processes (no Ray): kept, cleared


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from raymb.data.synthetic import generate

    out = tmp_path_factory.mktemp("linear")
    generate("linear", out, rows=512, shards=2, noise=0.1, seed=3)
    return out / "train"


def _config(data: Path, tmp_path: Path, *sets: str):
    return load_config(
        None,
        [
            f"data.train={data}",
            f"run.storage_path={tmp_path / 'runs'}",
            "run.name=exp",
            "train.global_batch_size=32",
            *sets,
        ],
    )


def test_an_earlier_lr_finds_folder_is_cleared_and_marked(data, tmp_path):
    """An older lr-find's folder (no marker: what it wrote under Ray, a dead driver's lock
    too) is cleared file by file; the new test marks its folder finished; the run's own
    directory is untouched."""
    run = tmp_path / "runs" / "exp"
    _write(run, {"run.json": "{}", "metrics.csv": "step,train_loss\n1,0.5\n"})
    before = tree(run)
    folder = tmp_path / "runs" / "exp-lr-find"
    gone = {"host": socket.gethostname(), "pid": 2**22 + 1, "started": 1.0, "token": "x"}
    old = {
        "lr_find.csv": HEADER,
        "lr_find.png": "png",
        "logs/ray.log": "ray\n",
        ".validate_storage_marker": "",
        ".lr_find.png.tmp": "half a picture",
        ".lock": json.dumps(gone),
    }
    _write(folder, old)
    result = lr_find(_config(data, tmp_path), low=1e-4, high=10.0, steps=12, backend="gloo")
    assert result.suggested is not None
    assert sorted(p.name for p in folder.iterdir()) == [
        "lr_find.csv",
        "lr_find.json",
        "lr_find.png",
    ]
    marker = json.loads((folder / MARKER_FILE).read_text())
    assert marker["raymb"] == "lr-find" and marker["status"] == "finished"
    assert marker["steps_done"] == 12 and marker["suggested"] == result.suggested
    assert marker["run"] == "exp" and marker["steps"] == 12
    with open(folder / "lr_find.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 12
    assert tree(run) == before


def test_ctrl_c_stops_marks_the_folder_interrupted_and_exits_130(data, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C: the workers stop at the same
    step, the curve so far stays in lr_find.csv, lr_find.json says interrupted, one line on
    stderr, exit 130; no lock or STOP file is left."""
    steps = 20000
    sets = [
        f"data.train={data}",
        f"run.storage_path={tmp_path / 'runs'}",
        "run.name=exp",
        "train.global_batch_size=32",
        "scale.workers=2",
    ]
    script = (
        "import sys\n"
        "from raymb.cli.main import _parser\n"
        "from raymb.cli.lr_find import run_lr_find\n"
        "sys.exit(run_lr_find(_parser().parse_args(sys.argv[1:]), backend='gloo'))\n"
    )
    # Rates too low to diverge: only the signal ends it before its 20000 steps.
    args = ["lr-find", "--min", "1e-7", "--max", "1e-6", "--steps", str(steps)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args, *(a for s in sets for a in ("--set", s))],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        for line in proc.stdout:  # the first progress line: 10% of the steps taken
            if line.startswith("raymb: lr-find: step "):
                break
        else:
            pytest.fail(f"no progress line (exit {proc.wait()}): {proc.stderr.read()[-3000:]}")
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 130, err[-3000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("raymb: interrupted")]
    assert len(lines) == 1, err[-3000:]
    folder = tmp_path / "runs" / "exp-lr-find"
    with open(folder / "lr_find.csv", newline="") as f:
        done = len(list(csv.DictReader(f)))
    assert steps // 10 <= done < steps
    assert f"stopped after {done} of {steps} steps" in lines[0]
    assert "suggests no rate" in lines[0] and str(folder / "lr_find.csv") in lines[0]
    marker = json.loads((folder / MARKER_FILE).read_text())
    assert marker["status"] == "interrupted" and marker["steps_done"] == done
    assert not (folder / ".lock").exists() and not (folder / "STOP").exists()
    assert not (folder / "lr_find.png").exists()  # no suggestion was made
    assert not (tmp_path / "runs" / "exp").exists()
