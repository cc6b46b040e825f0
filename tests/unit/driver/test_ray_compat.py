"""raymb.driver.ray_compat holds every private Ray name raymb uses (read as text: no Ray in
this tier), and says in one line when the installed Ray is not the pinned one (a subprocess)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
COMPAT = ROOT / "raymb" / "driver" / "ray_compat.py"

PRIVATE = re.compile(
    r"ray\._private|ray\._raylet|\._internal\b|_global_node|_create_default_callbacks"
    r"|print_to_stdstream|global_worker|kill_actor|PlacementGroupCleanerCallback"
    r"|WorkerGroupCallback|\bray(?:\.[A-Za-z]\w*)*\._\w"
)
"""Ray's private modules and the private names raymb reaches through them; `ray.x._y`."""


def test_private_ray_names_appear_in_ray_compat_only():
    found = []
    for path in sorted((ROOT / "raymb").rglob("*.py")):
        if path == COMPAT:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []
    text = COMPAT.read_text()
    for name in ("ray._private", "_global_node", "_create_default_callbacks", "kill_actor"):
        assert name in text, name  # the pattern still names what ray_compat holds


def test_the_pinned_version_is_pyproject_s():
    pin = re.search(r'"ray\[[\w,]+\]==([\w.]+)"', (ROOT / "pyproject.toml").read_text())
    pinned = re.search(r'^PINNED = "([\w.]+)"$', COMPAT.read_text(), re.MULTILINE)
    assert pin and pinned and pinned.group(1) == pin.group(1)


def test_another_ray_version_is_one_line_naming_the_workarounds():
    pinned = re.search(r'^PINNED = "([\w.]+)"$', COMPAT.read_text(), re.MULTILINE).group(1)
    script = (
        "import importlib, sys, ray\n"
        "ray.__version__ = sys.argv[1]\n"
        "import raymb.driver.ray_compat as compat\n"
        "print('--', file=sys.stderr, flush=True)\n"
        "ray.__version__ = '0.0.1'\n"
        "importlib.reload(compat)\n"
        "print('\\n'.join(compat.WORKAROUNDS))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, pinned],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    before, after = done.stderr.split("--\n")
    assert "raymb:" not in before  # the pinned version: nothing said
    lines = after.splitlines()
    assert len(lines) == 1 and lines[0].startswith("raymb: Ray 0.0.1 is installed"), lines
    workarounds = done.stdout.splitlines()
    assert len(workarounds) >= 4 and all(w in lines[0] for w in workarounds)
