#!/usr/bin/env python3
"""The two Quickstart commands: `python3 run.py train` and `python3 run.py test`.

Each creates .venv on first use (torch 2.13.0 and ray 2.60.0 pinned, versions locked by
requirements.lock), then runs `raymb train ...` or the test suite inside it. Extra
arguments are passed on: `python3 run.py train --config jobs/configs/mlp_classify.toml`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".raymb-installed"


def ensure_venv() -> None:
    """Create .venv and install raymb with its test extras, once per change of the pins."""
    wanted = (ROOT / "pyproject.toml").read_text() + (ROOT / "requirements.lock").read_text()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print(
            "run.py: creating .venv (first run: installs torch and ray, a few minutes)", flush=True
        )
        venv.create(VENV, with_pip=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    # torch first, alone and exactly pinned, so nothing can pull a different (multi-GB) build.
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["-c", str(ROOT / "requirements.lock"), "-e", f"{ROOT}[test]"], check=True)
    STAMP.write_text(wanted)


def main() -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 - run.py is what an old Python runs first
        sys.exit("run.py: raymb needs Python >= 3.10")
    command, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command not in ("train", "test"):
        sys.exit("usage: python3 run.py train [raymb train options] | test [pytest options]")
    ensure_venv()
    os.chdir(ROOT)
    if command == "train":
        return subprocess.call([str(BIN / "raymb"), "train", *rest])
    # pytest exits 5 when it collects no test: that is a failure here, never a green run.
    code = subprocess.call([str(BIN / "python"), "-m", "pytest", *rest])
    if code == 5:
        print("run.py: pytest collected no tests", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
