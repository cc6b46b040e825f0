"""Several nodes, no shared filesystem: data, checkpoints and run files in an S3 bucket.

One Ray cluster of three nodes on this machine (ray.cluster_utils.Cluster: a head with one
CPU for Ray Data's reads, two worker nodes of two CPUs, so each worker of 2 CPUs lands on a
node of its own) and one S3 server (moto's, on 127.0.0.1). Nothing of a run goes through the
local filesystem: the data is read from the bucket, the workers upload their checkpoint files
to it, and the driver reads the run's files back from it.

The runs are full-batch gradient descent on a linear regression, so the independent reference
is a few lines of torch: whatever the nodes, workers and restarts, the parameters must be
those of plain gradient descent on all rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from raymb import load_config
from raymb.cli import main as cli_main
from raymb.storage import resolve

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

BUCKET = "raymb"
RUNS = f"s3://{BUCKET}/runs"
DATA = f"s3://{BUCKET}/data"
LR = 0.5
COMMON = (
    f"run.storage_path={RUNS}",
    f"data.train={DATA}/train",
    f"data.val={DATA}/val",
    "data.cache=true",
    "train.global_batch_size=all",
    "train.microbatch_size=512",
    "optim.momentum=0.0",
    f"optim.lr={LR}",
    "checkpoint.every_steps=20",
    "scale.workers=[1,2]",
    "scale.cpus_per_worker=2",
    "scale.max_failures=4",  # the lost node, and a restart that first counts its CPUs
)


@pytest.fixture(scope="module")
def bucket(s3, linear_data):
    fs = s3.bucket(BUCKET)
    pafs.copy_files(str(linear_data), f"{BUCKET}/data", destination_filesystem=fs)
    return fs


@pytest.fixture(scope="module")
def cluster(s3, bucket):
    """Head (1 CPU) + two worker nodes (2 CPUs each); started after the S3 fixture so that
    every node's processes have its AWS_* environment."""
    import ray
    from ray.cluster_utils import Cluster

    # A dead node is noticed in ~2 s rather than Ray's default ~15 s; a restart that counts
    # the dead node's CPUs as free gives up on that worker group after 10 s, not 60.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "10"
    fast_death = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    head = {"num_cpus": 1, "include_dashboard": False, "_system_config": fast_death}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()
    del os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]


def _gradient_descent(linear_data: Path, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    table = pq.read_table(linear_data / "train")
    x = torch.tensor(table["features"].to_pylist(), dtype=torch.float32)
    y = torch.tensor(table["label"].to_pylist(), dtype=torch.float32)
    torch.manual_seed(0)  # raymb seeds train.seed=0 before building the model
    init = torch.nn.Linear(x.shape[1], 1)
    w, b = init.weight.detach().clone(), init.bias.detach().clone()
    for _ in range(steps):
        err = (x @ w.T).squeeze(-1) + b - y
        w = w - LR * (2 * err[:, None] * x).mean(0, keepdim=True)
        b = b - LR * (2 * err).mean(0, keepdim=True)
    return w, b


def _assert_params(summary: dict, linear_data: Path, steps: int) -> None:
    from raymb.tools.load import load_model

    model, _ = load_model(summary["checkpoint"])
    w, b = _gradient_descent(linear_data, steps)
    torch.testing.assert_close(model.weight.detach(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bias.detach(), b, rtol=1e-5, atol=1e-6)


def _latest_report(run: str) -> dict | None:
    """The metrics of the newest checkpoint Ray Train registered, from its record in the bucket."""
    try:
        text = resolve(f"{RUNS}/{run}/checkpoint_manager_snapshot.json").read_text()
    except FileNotFoundError:
        return None
    latest = json.loads(text).get("latest_checkpoint_result")
    return latest["metrics"] if latest else None


def _look_at_the_nodes_again() -> None:
    """Ray Train sizes an elastic run from Ray Data's AutoscalingCoordinator, one detached
    actor for the whole cluster, which looks at the nodes every 20 s: until it looks again, a
    run started after a node joined counts one worker node. Have it look now."""
    import ray

    try:
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    except ValueError:  # none yet: the next run's own sees every node
        return
    ray.get(coordinator.get_reserved_resources.remote("raymb-tests", recompute=True))


def test_a_node_lost_mid_run_the_run_ends_on_the_nodes_left(cluster, linear_data):
    import raymb

    ray_cluster, worker_nodes = cluster
    epochs = 200
    config = load_config(None, [*COMMON, "run.name=multi", f"train.epochs={epochs}"])
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = raymb.train(config)
        except BaseException as e:  # re-raised below
            outcome["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while (report := _latest_report("multi")) is None:
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.2)
    # Two workers, each on a node of its own, wrote that checkpoint.
    assert (report["workers"], report["nodes"]) == (2, 2)
    # A cluster this process joined keeps Ray Train's defaults: its preemption watcher runs.
    from ray._private import state

    from raymb.driver.cluster import started_here

    assert not started_here()
    assert "PreemptionWatcher" in {a["ActorClassName"] for a in state.actors().values()}
    assert report["step"] < epochs
    ray_cluster.remove_node(worker_nodes[1], allow_graceful=False)  # its raylet killed

    thread.join(timeout=600)
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    summary = outcome["result"].summary
    # The run went on from a checkpoint, on the one worker node left.
    assert summary["steps"] == epochs
    assert summary["resumed_from_steps"] and 0 < summary["resumed_from_steps"][0] < epochs
    assert (summary["workers"], summary["nodes"]) == (1, 1)
    assert summary["checkpoint"].startswith(f"{RUNS}/multi/checkpoint_")
    _assert_params(summary, linear_data, epochs)
    # The run's files are in the bucket, metrics.csv with each step once.
    run = resolve(f"{RUNS}/multi")
    assert {"run.json", "metrics.csv", "summary.json", "loss.png"} <= {
        c.name for c in run.children()
    }
    steps = [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().split()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == epochs


def test_a_run_resumes_by_name_from_another_working_directory_on_more_nodes(
    cluster, linear_data, tmp_path
):
    # A node joins again; `raymb train` from an empty directory, joining the cluster, finds
    # the run in the bucket by its name and trains 20 more epochs on both worker nodes.
    ray_cluster, _ = cluster
    ray_cluster.add_node(num_cpus=2)
    ray_cluster.wait_for_nodes()
    _look_at_the_nodes_again()
    sets = [a for s in (*COMMON, "run.name=multi", "train.epochs=220") for a in ("--set", s)]
    copies = set(Path(tempfile.gettempdir()).glob("raymb-metrics-*"))
    done = subprocess.run(
        [sys.executable, "-m", "raymb.cli", "train", "--address", ray_cluster.address, *sets],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.listdir(tmp_path) == []  # nothing of the run written here
    # ...nor left in the temporary folder: rank 0's local copy of metrics.csv is gone.
    assert set(Path(tempfile.gettempdir()).glob("raymb-metrics-*")) == copies
    summary = json.loads(resolve(f"{RUNS}/multi/summary.json").read_text())
    assert summary["steps"] == 220 and summary["resumed_from_steps"][-1] == 200
    assert (summary["workers"], summary["nodes"]) == (2, 2)
    _assert_params(summary, linear_data, 220)


def test_eval_reads_a_checkpoint_and_data_in_the_bucket(cluster, linear_data, capsys):
    summary = json.loads(resolve(f"{RUNS}/multi/summary.json").read_text())
    assert cli_main(["eval", "--checkpoint", summary["checkpoint"], "--data", f"{DATA}/val"]) == 0
    got = json.loads(capsys.readouterr().out)
    table = pq.read_table(linear_data / "val")
    x = torch.tensor(table["features"].to_pylist(), dtype=torch.float32)
    y = torch.tensor(table["label"].to_pylist(), dtype=torch.float32)
    w, b = _gradient_descent(linear_data, 220)
    expected = (((x @ w.T).squeeze(-1) + b - y) ** 2).mean().item()
    assert got["rows"] == len(y)
    assert got["loss"] == pytest.approx(expected, rel=1e-4)


def test_missing_bucket_and_refused_credentials_are_one_line(
    cluster, linear_data, refusing_s3, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    local = [f"--set=data.train={linear_data / 'train'}", f"--set=data.val={linear_data / 'val'}"]
    code = cli_main(["train", "--set=run.storage_path=s3://no-such-bucket/runs", *local])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "s3://no-such-bucket/runs" in err and "NO_SUCH_BUCKET" in err
    monkeypatch.setenv("AWS_ENDPOINT_URL", refusing_s3)
    code = cli_main(["train", f"--set=run.storage_path={RUNS}", *local])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert RUNS in err and "ACCESS_DENIED" in err
    code = cli_main(["eval", "--checkpoint", f"{RUNS}/multi/x/model.pt", "--data", DATA])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "ACCESS_DENIED" in err, err
    assert os.listdir(tmp_path) == []
