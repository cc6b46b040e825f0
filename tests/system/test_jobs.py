"""jobs/: the `ray job submit` entrypoint, its configs and runtime_env, and a real cluster.

Fast checks run jobs/train.py as a script without Ray. The `ray` tier starts a real head
with `ray start --head` (token authentication on, its own ports, temp dir and HOME, so the
user's ~/.ray and any other Ray on the machine are left alone), submits jobs/train.py with
the real `ray job submit` CLI and checks that a submission without the token is refused. One
job trains, and `raymb train --address` joining the head resumes it under the same name (two
Ray Train fits in all)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from raymb.data.synthetic import generate

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "jobs" / "train.py"
RAY = Path(sys.executable).parent / "ray"  # the CLI of the Ray this interpreter imports
RAY_ENV_VARS = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_JOB_ID",
)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without Ray's address and auth settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in RAY_ENV_VARS}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", **extra}


def run_train(*args: str, cwd: Path = REPO, script: Path = TRAIN) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("jobs/train.py: error: "), proc.stderr
    return lines[0]


# ---------------------------------------------------------------- the script, no Ray


def test_help_explains_every_flag() -> None:
    proc = run_train("--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--config", "--name", "--set", "--print-config"):
        assert flag in proc.stdout
    assert "resume" in proc.stdout


def test_default_run_name_is_config_stem_and_utc_time() -> None:
    proc = run_train("--config", "jobs/configs/linear.toml", "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r'^name = "linear-\d{8}-\d{6}"$', proc.stdout, re.M), proc.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--name", "demo"], "demo"),
        (["--set", "run.name=from-set"], "from-set"),
        (["--set", "run.name=from-set", "--name", "demo"], "demo"),  # --name wins
    ],
)
def test_run_name_given(args: list[str], expected: str) -> None:
    proc = run_train("--config", "jobs/configs/linear.toml", "--print-config", *args)
    assert proc.returncode == 0, proc.stderr
    assert f'name = "{expected}"' in proc.stdout.splitlines()


def test_relative_storage_path_is_refused_before_ray() -> None:
    proc = run_train("--config", "jobs/configs/linear.toml", "--name", "x")
    assert proc.returncode == 2
    assert "run.storage_path='runs' is relative" in one_line_error(proc)


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--set", "train.epochs=0"], "train.epochs"),
        (["--set", "optim.nope=1"], "optim.nope"),
        (["--name", "a/b"], "run.name"),
    ],
)
def test_config_errors_are_one_line(args: list[str], key: str) -> None:
    proc = run_train("--config", "jobs/configs/linear.toml", *args)
    assert proc.returncode == 2
    assert key in one_line_error(proc)


def test_missing_config_file() -> None:
    proc = run_train("--config", "jobs/configs/nope.toml")
    assert proc.returncode == 2
    assert "config file not found: jobs/configs/nope.toml" in one_line_error(proc)


def test_runs_from_a_copy_of_the_repo_without_raymb_installed(tmp_path: Path) -> None:
    """A job runs from Ray's copy of the working dir: jobs/train.py imports that copy's raymb
    (ahead of any installed one), wherever it is started from."""
    for part in ("raymb", "jobs"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "raymb" / "__init__.py", "a") as f:
        f.write('\nimport sys as _sys\n_sys.stderr.write("raymb imported from the copy\\n")\n')
    proc = run_train(
        "--config",
        str(tmp_path / "jobs/configs/linear.toml"),
        "--print-config",
        cwd=tmp_path.parent,
        script=tmp_path / "jobs" / "train.py",
    )
    assert proc.returncode == 0, proc.stderr
    assert "raymb imported from the copy" in proc.stderr


def test_runtime_env_yaml_is_valid_and_pinned_like_the_lock() -> None:
    from ray.runtime_env import RuntimeEnv

    spec = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert spec["working_dir"] == "."
    RuntimeEnv(**spec)  # Ray's own validation of every field
    lock = dict(
        line.split("==", 1)
        for line in (REPO / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    packages = spec["pip"]["packages"] if isinstance(spec["pip"], dict) else spec["pip"]
    pins = dict(p.split("==", 1) for p in packages)
    assert pins, packages
    assert "ray" not in pins  # the cluster's own Ray, never a second one
    assert {"torch", "numpy", "pyarrow"} <= pins.keys()
    for name, version in pins.items():
        assert lock.get(name) == version, (name, version)


# ---------------------------------------------------------------- a real cluster


@dataclass(frozen=True)
class Cluster:
    root: Path  # the test's own temp dir: data, runs, Ray's temp dir, HOME
    address: str  # the dashboard, where `ray job submit` goes
    token: str
    home: Path  # HOME of the head and the first submission: holds .ray/auth_token
    gcs: str  # host:port of the head's GCS, where a driver joins (raymb train --address)
    head: subprocess.Popen  # `ray start --head --block`

    def env(self, *, home: Path, **extra: str) -> dict[str, str]:
        return clean_env(HOME=str(home), **extra)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _kill_leftovers(marker: str) -> None:
    """SIGKILL what is still running from our temp dir (nothing of anyone else names it)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def _stop_head(head: subprocess.Popen) -> None:
    """Stop the head we started and everything in its process group; never `ray stop`,
    which would stop every Ray on the machine."""
    head.send_signal(signal.SIGTERM)  # `ray start --block` then stops what it started
    try:
        head.wait(timeout=2)  # an idle head is gone in ~2 s; one that ran jobs drains longer
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.killpg(head.pid, signal.SIGKILL)  # what is left of the group
        except ProcessLookupError:
            break
        head.poll()  # reap the leader: a zombie still counts as a member
        time.sleep(0.1)
    head.wait()


def _wait_for_jobs_api(address: str, token: str, head: subprocess.Popen, log: Path) -> None:
    request = urllib.request.Request(
        f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start --head exited with {head.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    pytest.fail(f"the jobs API at {address} did not answer in 120 s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not RAY.exists():
        pytest.skip(f"no ray CLI beside {sys.executable}")
    # Short: Ray puts unix sockets under its temp dir (~107 characters at most).
    root = Path(tempfile.mkdtemp(prefix="raymb-"))
    home = root / "home"
    home.mkdir()
    head = None
    try:
        # `ray start --head` turns token auth on when it finds a token; make one in our HOME.
        subprocess.run(
            [str(RAY), "get-auth-token", "--generate"],
            env=clean_env(HOME=str(home)),
            check=True,
            capture_output=True,
            timeout=60,
        )
        token = (home / ".ray" / "auth_token").read_text().strip()
        gcs, dashboard, client, agent, metrics, autoscaler = _free_ports(6)
        env = clean_env(
            HOME=str(home),
            RAY_AUTH_MODE="token",
            # The job's `python` is the first on the head's PATH: this interpreter's.
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            # Fixed by default, and maybe held by another Ray on this machine.
            DASHBOARD_METRIC_PORT=str(metrics),
            AUTOSCALER_METRIC_PORT=str(autoscaler),
        )
        options = (
            # The node's own address, not 127.0.0.1: ray.init turns a loopback address into
            # the node's, so a driver (raymb train --address) finds no raylet on 127.0.0.1.
            f"--port {gcs} --ray-client-server-port {client} "
            f"--dashboard-host 127.0.0.1 --dashboard-port {dashboard} "
            f"--dashboard-agent-listen-port {agent} --min-worker-port 0 --max-worker-port 0 "
            "--num-cpus 4 --disable-usage-stats"
        ).split()  # worker ports 0: any free ones
        log = root / "head.log"
        with log.open("w") as out:
            head = subprocess.Popen(
                [str(RAY), "start", "--head", "--block", *options, "--temp-dir", str(root / "ray")],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, for _stop_head
            )
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_jobs_api(address, token, head, log)
        generate("linear", root / "data", rows=512, shards=2)
        gcs_address = f"127.0.0.1:{gcs}"
        yield Cluster(
            root=root, address=address, token=token, home=home, gcs=gcs_address, head=head
        )
    finally:
        if head is not None:
            _stop_head(head)
        _kill_leftovers(f"{root}{os.sep}")
        shutil.rmtree(root, ignore_errors=True)


def submit(
    cluster: Cluster, *entrypoint_args: str, env: dict[str, str]
) -> subprocess.CompletedProcess:
    """`ray job submit` of jobs/train.py, waiting for the job to end (its exit status)."""
    command = [
        str(RAY),
        "job",
        "submit",
        "--address",
        cluster.address,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "jobs/train.py",
        *entrypoint_args,
    ]
    for _ in range(120):
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        # The dashboard takes the job only once the head's agent has registered.
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(0.5)
    return proc


def job_count(cluster: Cluster) -> int:
    request = urllib.request.Request(
        f"{cluster.address}/api/jobs/", headers={"Authorization": f"Bearer {cluster.token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return len(json.load(response))


def training_args(cluster: Cluster, name: str, epochs: int) -> list[str]:
    data, runs = cluster.root / "data", cluster.root / "runs"
    return [
        "--config",
        "jobs/configs/linear.toml",
        "--name",
        name,
        "--set",
        f"data.train={data / 'train'}",
        "--set",
        f"data.val={data / 'val'}",
        "--set",
        f"run.storage_path={runs}",
        "--set",
        f"train.epochs={epochs}",
        "--set",
        "train.log_every=4",
    ]


@pytest.mark.ray
def test_submission_without_the_token_is_refused(cluster: Cluster) -> None:
    before = job_count(cluster)
    elsewhere = cluster.root / "no-token-home"
    elsewhere.mkdir(exist_ok=True)
    args = training_args(cluster, "refused", epochs=1)

    # No token anywhere: the client sends none and the server answers 401.
    proc = submit(cluster, *args, env=cluster.env(home=elsewhere))
    assert proc.returncode != 0
    assert "Unauthorized: Missing authentication token" in proc.stdout + proc.stderr

    # A wrong token: 403.
    proc = submit(
        cluster,
        *args,
        env=cluster.env(
            home=elsewhere, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * len(cluster.token)
        ),
    )
    assert proc.returncode != 0
    assert "Invalid authentication token" in proc.stdout + proc.stderr

    assert job_count(cluster) == before  # neither reached the job manager
    assert not (cluster.root / "runs" / "refused").exists()


@pytest.mark.ray
def test_a_job_trains_and_raymb_train_joining_the_head_resumes_it(cluster: Cluster) -> None:
    """A job submitted with the token in RAY_AUTH_TOKEN (as from another machine) trains one
    epoch; `raymb train --address` against the head, under the same run name, resumes it to
    two (its token from ~/.ray/auth_token, as on the head node), and the head outlives it."""
    import pyarrow.parquet as pq

    run_dir = cluster.root / "runs" / "jobtest"
    elsewhere = cluster.root / "submitter-home"
    elsewhere.mkdir(exist_ok=True)
    proc = submit(
        cluster,
        *training_args(cluster, "jobtest", epochs=1),
        env=cluster.env(home=elsewhere, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster.token),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"jobs/train.py: summary {run_dir / 'summary.json'}" in proc.stdout
    first = json.loads((run_dir / "summary.json").read_text())
    rows = pq.read_table(cluster.root / "data" / "train").num_rows
    assert first["steps"] == -(-rows // 64)  # 1 epoch at G = 64, the last step short
    assert first["resumed_from_steps"] == []
    assert Path(first["checkpoint"]).is_file()

    before = job_count(cluster)
    config = training_args(cluster, "jobtest", epochs=2)
    config[2:4] = ["--set", "run.name=jobtest"]  # raymb train names the run in the config
    proc = subprocess.run(
        [sys.executable, "-m", "raymb.cli", "train", "--address", cluster.gcs, *config],
        cwd=REPO,
        env=cluster.env(home=cluster.home, RAY_AUTH_MODE="token"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    second = json.loads((run_dir / "summary.json").read_text())
    assert second["resumed_from_steps"] == [first["steps"]]
    assert second["steps"] == 2 * first["steps"]
    assert second["workers"] == 2
    # The head is still up and serving: its process, and its jobs API (one more driver seen).
    assert cluster.head.poll() is None
    assert job_count(cluster) >= before


@pytest.mark.ray
def test_job_with_unreadable_data_fails_with_a_one_line_error(cluster: Cluster) -> None:
    # The config's relative data/linear/train: Ray's copy of the working dir has no data/.
    proc = submit(
        cluster,
        "--config",
        "jobs/configs/linear.toml",
        "--name",
        "no-data",
        "--set",
        f"run.storage_path={cluster.root / 'runs'}",
        env=cluster.env(home=cluster.home, RAY_AUTH_MODE="token"),
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stdout.splitlines() if line.startswith("jobs/train.py: error:")]
    assert errors, proc.stdout[-4000:]
    assert "data.train: no such file or directory: data/linear/train" in errors[0]
    assert "exit code 2" in proc.stdout
