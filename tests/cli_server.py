"""A warm `raymb` for the refusal batteries: this script imports raymb.cli once, then forks a
child per request, which runs `raymb ARGS` as `python -m raymb.cli ARGS` would (its own
process, cwd, environment, stdin from /dev/null, stdout and stderr to files, its exit status),
so a case costs a fork instead of an interpreter's start and raymb.cli's imports (numpy,
pyarrow, pydantic: about 0.4 s a case on a 2-core machine). What a refusal imports beyond them
(torch, Ray) it still imports itself, and the child reports both (see `modules`).

Protocol, one JSON line each way on stdin/stdout: {"args", "cwd", "env"} in; {"returncode",
"stdout", "stderr", "modules"} out. conftest.run_raymb(..., warm=True) is the client.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

HEAVY = ("torch", "ray")
"""The imports a refusal must not wait for (docs/refusals.md): reported after each case."""

PRELOAD = (
    "concurrent.futures",
    "pydoc",
    "PIL.Image",
    "pyarrow.compute",
    "pyarrow.parquet",
    "raymb.data.checks",
    "raymb.data.folder",
    "raymb.data.images",
    "raymb.data.synthetic",
    "raymb.data.text",
    "raymb.driver.lr_find",
    "raymb.driver.preflight",
    "raymb.driver.run",
    "raymb.driver.tune_preflight",
    "raymb.rundir.runs",
    "raymb.tools.checkpoint_checks",
    "raymb.tools.load",
)
"""What the refusals import beyond raymb.cli (found by logging their new modules), none of it
torch or Ray: imported once here, not in every child. A name gone in a refactor is skipped."""


def _child(request: dict, out: Path, err: Path, protocol: int) -> None:
    """In the forked child: become `python -m raymb.cli ARGS` in cwd, and exit as it would."""
    from raymb.cli.main import main

    os.close(protocol)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    for fd, path in ((1, out), (2, err)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # TMPDIR is read again, as a new process reads it
    sys.path[0] = os.getcwd()  # `python -m` puts its cwd first
    sys.argv = [str(Path(sys.modules["raymb.cli"].__file__).parent / "__main__.py")]
    sys.argv += request["args"]
    try:
        code = main(request["args"])
    except SystemExit as e:  # argparse's refusals, and any sys.exit
        code = e.code
    except BaseException:
        traceback.print_exc()
        code = 1
    modules = [name for name in HEAVY if name in sys.modules]
    with open(f"{out}.modules", "w") as f:
        json.dump(modules, f)
    # As the interpreter's own exit, less its module teardown (0.1 s here): atexit handlers
    # (weakref.finalize's among them), flushes, the status sys.exit(code) would give.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if code is None or isinstance(code, int):
        os._exit(code or 0)
    print(code, file=sys.stderr)  # sys.exit("message"): the message, status 1
    sys.stderr.flush()
    os._exit(1)


def serve() -> None:
    import importlib

    import raymb.cli.main  # noqa: F401 - the imports every case shares, done once

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    heavy = [name for name in HEAVY if name in sys.modules]
    assert not heavy, f"the preloaded modules import {heavy}: a child could not tell"

    private = Path(tempfile.mkdtemp(prefix="raymb-cli-server-"))
    protocol = os.dup(1)  # replies; fds 0/1/2 become the child's own
    for line in sys.stdin:
        request = json.loads(line)
        out, err = private / "out", private / "err"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request, out, err, protocol)
        status = os.waitpid(pid, 0)[1]
        reply = {
            "returncode": os.waitstatus_to_exitcode(status),
            "stdout": out.read_text(errors="replace"),
            "stderr": err.read_text(errors="replace"),
            "modules": json.loads(Path(f"{out}.modules").read_text())
            if Path(f"{out}.modules").exists()
            else None,
        }
        for path in (out, err, Path(f"{out}.modules")):
            path.unlink(missing_ok=True)
        data = (json.dumps(reply) + "\n").encode()
        while data:
            data = data[os.write(protocol, data) :]


if __name__ == "__main__":
    serve()
