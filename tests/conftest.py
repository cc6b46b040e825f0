"""Fixtures the test modules share."""

from __future__ import annotations

import atexit
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

SPAWNS = (
    "assert_refused(",
    "run_raymb(",
    "spawn_gloo(",
    "run_torch(",
    "train_torch(",
    "lr_find(",
    "subprocess.",
    "mp.spawn(",
)
"""What, in a unit module's text, starts another process: a CLI run, a gloo group, a script."""


def pytest_collection_modifyitems(config, items) -> None:
    """Mark `procs` the unit tests of modules that start processes (CLI subprocesses, gloo
    groups): `-m "not procs"` runs the in-process ones alone, in seconds. The other tiers all
    start processes, and are marked by their folder."""
    text: dict[str, bool] = {}
    for item in items:
        path = str(item.path)
        if f"{os.sep}tests{os.sep}unit{os.sep}" not in path:
            continue
        if path not in text:
            source = item.path.read_text()
            text[path] = any(s in source for s in SPAWNS)
        if text[path]:
            item.add_marker(pytest.mark.procs)


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray session for a module that asks for it (4 logical CPUs: two workers and
    room for Ray Data's reads), shut down after its last test."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def linear_data(tmp_path_factory):
    """A linear regression y = 2x + 1 + noise: 1024 training rows in 4 shards, and val."""
    from raymb.data.synthetic import generate

    out = tmp_path_factory.mktemp("linear")
    generate("linear", out, rows=1024, shards=4, noise=0.1, seed=3)
    return out


S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")


@contextmanager
def moto_server(*, auth: bool = False) -> Iterator[str]:
    """A real S3-compatible server (moto's) on 127.0.0.1, stopped after; yields its URL.
    `auth`: every request must be signed by a key the server knows (none are), so any
    credentials are refused, as a real store refuses wrong ones."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"} if auth else None
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@dataclass(frozen=True)
class S3:
    """A moto server the process's AWS_* environment points at."""

    url: str

    def bucket(self, name: str):
        """Make bucket `name`; return a pyarrow filesystem on the server."""
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override=self.url, allow_bucket_creation=True)
        fs.create_dir(name)
        return fs


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    """An S3 server for the module, with AWS_ENDPOINT_URL and test credentials set in this
    process's environment (so Ray nodes started after it inherit them)."""
    saved = {k: os.environ.get(k) for k in S3_ENV}
    with moto_server() as url:
        os.environ.update(
            AWS_ENDPOINT_URL=url,
            AWS_ACCESS_KEY_ID="test",
            AWS_SECRET_ACCESS_KEY="test",
            AWS_REGION="us-east-1",
        )
        try:
            yield S3(url)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def refusing_s3() -> Iterator[str]:
    """The URL of an S3 server that knows no key, so it refuses whatever credentials come."""
    with moto_server(auth=True) as url:
        yield url


def tree(root) -> dict[str, bytes | None]:
    """Every path under root, with a file's bytes (None for a directory or a link)."""
    from pathlib import Path

    root = Path(root)
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
        for p in sorted(root.rglob("*"))
    }


@dataclass(frozen=True)
class Refusal:
    """What one `raymb` command printed and how long it took: `line` is its one stderr line.
    `modules`: which of torch and Ray it imported (known for a warm run only)."""

    returncode: int
    stderr: str
    seconds: float
    modules: tuple[str, ...] | None = None

    @property
    def line(self) -> str:
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("raymb: error: "), self.stderr[-2000:]
        return lines[0]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(env: dict[str, str] | None) -> dict[str, str]:
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([ROOT, full_env.get("PYTHONPATH", "")])
    return full_env


_server: subprocess.Popen | None = None


def _warm_server() -> subprocess.Popen:
    """tests/cli_server.py, started on first use and stopped when pytest exits."""
    global _server
    if _server is None or _server.poll() is not None:
        script = os.path.join(ROOT, "tests", "cli_server.py")
        _server = subprocess.Popen(
            [sys.executable, script],
            env=_env(None),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        atexit.register(_stop_server, _server)
    return _server


def _stop_server(server: subprocess.Popen) -> None:
    server.stdin.close()  # its loop ends
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def run_raymb(
    args: list[str], cwd, env: dict[str, str] | None = None, *, warm: bool = False
) -> Refusal:
    """`raymb ARGS` as a new process in `cwd`. Cold (the default): `python -m raymb.cli`, so
    its time counts every import. Warm: forked from tests/cli_server.py, which imported
    raymb.cli once (its time counts what the command imports beyond that: torch, Ray)."""
    start = time.monotonic()
    if warm:
        server = _warm_server()
        request = {"args": list(args), "cwd": str(cwd), "env": _env(env)}
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        ready, _, _ = select.select([server.stdout], [], [], 300)
        assert ready, f"raymb {args} did not end in 300 s"
        reply = json.loads(server.stdout.readline())
        modules = reply["modules"]
        return Refusal(
            reply["returncode"],
            reply["stderr"],
            time.monotonic() - start,
            None if modules is None else tuple(modules),
        )
    proc = subprocess.run(
        [sys.executable, "-m", "raymb.cli", *args],
        cwd=cwd,
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    return Refusal(proc.returncode, proc.stderr, time.monotonic() - start)


def assert_refused(
    args: list[str], cwd, *words: str, env: dict[str, str] | None = None, cold: bool = False
) -> str:
    """`raymb ARGS` in `cwd` is refused: exit 2, one line holding every word, nothing written
    under `cwd`, in under 2 s (issue 20's bar for a refusal, imports counted). Returns the line.
    Warm (the default): the process is forked from one that imported raymb.cli already, and
    neither torch nor Ray may be imported (the checks run before them, docs/refusals.md).
    `cold`: a new interpreter, its time counting every import (test_cli_errors.py has some)."""
    before = tree(cwd)
    result = run_raymb(args, cwd, env, warm=not cold)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.line
    for w in words:
        assert w in line, (w, line)
    assert tree(cwd) == before, "a refusal writes nothing"
    assert result.seconds < 2.0, f"refused in {result.seconds:.2f} s: {line}"
    assert not result.modules, f"imported {result.modules} before refusing: {line}"
    return line


def spawn_gloo(worker, nprocs: int) -> dict:
    """`worker(rank, port, results)` on `nprocs` spawned processes that meet on a free port of
    127.0.0.1 (each sets up its own gloo group); the dict of what each rank put in `results`."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        left = manager.Barrier(nprocs)
        mp.spawn(_gloo_rank, args=(worker, port, results, left), nprocs=nprocs, join=True)
        return dict(results)


def _gloo_rank(rank: int, worker, port: int, results, left) -> None:
    """One rank of spawn_gloo: `worker`, then wait until every rank has returned from its
    own. Rank 0 serves the group's store, and a rank that exits while a peer is still inside
    destroy_process_group closes sockets under the peer's gloo threads, which abort it
    (SIGABRT: "terminate called without an active exception"; raymb/driver/launch.py waits
    alike since 48456a9). A rank that raised is not waited for: mp.spawn ends the others."""
    worker(rank, port, results)
    left.wait(timeout=60)
