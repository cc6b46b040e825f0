"""Ray's lines in <run dir>/logs/ray.log, raymb's and the user's on the terminal (no Ray).

The batches are what Ray 2.60's driver hands its printer (ray._private.worker.
print_to_stdstream): one process's lines, with its pid, actor or task name and stream; the
texts are lines that Ray printed in a real `raymb train` with a worker killed by
fault.kill_worker_at_step.
"""

from __future__ import annotations

import io
import logging

import pytest

from raymb import storage
from raymb.driver.logs import RAY_LOG, RayLog, divert, notices

CONTROLLER_FAILURE = [  # Ray Train's controller, on its stderr, once rank 1 was killed
    "[FailurePolicy] RAISE",
    "  Source: worker group",
    "  Error count: 1 (max allowed: 0)",
    "Error: Training failed due to worker errors:",
    "[Rank 1 Error Snippet]:",
    "A worker health check failed.",
    "Worker info: Worker(",
    "  actor=Actor(RayTrainWorker, 49f3144ee24b8400db8bbf0c01000000),",
    "  metadata=ActorMetadata(",
    "    hostname='vm',",
    "    node_ip='192.0.2.2',",
    "    pid=27813,",
    "  ),",
    ")",
    "The actor died unexpectedly before finishing this task.",
    "\tclass_name: RayTrainWorker",
    "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR",
]


def batch(lines, *, actor="", task="", pid=27781, err=False, ip="192.0.2.2") -> dict:
    return {
        "ip": ip,
        "pid": pid,
        "job": "01000000",
        "is_err": err,
        "lines": lines,
        "actor_name": actor,
        "task_name": task,
        "localhost": "192.0.2.2",
    }


@pytest.fixture
def run(tmp_path):
    shown: list[str] = []
    log = RayLog(storage.resolve(str(tmp_path / "run")), say=shown.append)
    yield log, shown, tmp_path / "run" / RAY_LOG
    log.close()


def test_the_users_print_in_a_worker_is_shown_rays_own_worker_lines_are_not(run):
    log, shown, path = run
    log.forwarded(batch(["my factory built 3 layers"], actor="RayTrainWorker"))
    log.forwarded(
        batch(
            [
                "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/r/c)",
                "Reporting training result 1: TrainingReport(checkpoint=None, metrics={})",
            ],
            actor="RayTrainWorker",
            err=True,
        )
    )
    log.forwarded(batch(["Requesting resources: {'CPU': 1.0} * 2"], actor="TrainController"))
    assert shown == ["(RayTrainWorker pid=27781) my factory built 3 layers"]
    text = path.read_text()  # line-buffered: readable while the run goes on
    assert "(RayTrainWorker pid=27781) Checkpoint successfully created at" in text
    assert "(TrainController pid=27781) Requesting resources" in text
    assert "(RayTrainWorker pid=27781) my factory built 3 layers" in text


def test_raymbs_own_lines_from_a_worker_lose_rays_prefix(run):
    log, shown, _ = run
    log.forwarded(batch(["raymb: resumed from step 50 (epoch 0)"], actor="RayTrainWorker"))
    log.forwarded(batch(["raymb: skipping f.parquet for now"], actor="RayTrainWorker", err=True))
    assert shown == ["raymb: resumed from step 50 (epoch 0)", "raymb: skipping f.parquet for now"]


def test_a_remote_worker_is_named_by_its_node_and_colours_are_dropped(run):
    log, shown, path = run
    log.forwarded(batch(["\x1b[32mhello\x1b[0m"], actor="RayTrainWorker", ip="10.0.0.7", pid=5))
    assert shown == ["(RayTrainWorker pid=5, ip=10.0.0.7) hello"]
    assert "\x1b" not in path.read_text()


def test_a_dead_worker_is_one_raymb_line_naming_rank_pid_and_what_follows(run):
    log, shown, path = run
    log.forwarded(batch(CONTROLLER_FAILURE, actor="TrainController", err=True))
    assert shown == [
        "raymb: training worker rank 1 (pid 27813) died; no restart left "
        "(failure 1; scale.max_failures = 0)"
    ]
    assert "[FailurePolicy] RAISE" in path.read_text()


def test_a_retried_failure_says_it_restarts():
    block = [line.replace("RAISE", "RETRY") for line in CONTROLLER_FAILURE]
    block[2] = "  Error count: 2 (max allowed: 3)"
    assert notices(block) == [
        "raymb: training worker rank 1 (pid 27813) died; restarting from the latest "
        "checkpoint (failure 2; scale.max_failures = 3)"
    ]


def test_memory_and_node_losses_are_named_and_plain_lines_are_not():
    oom = "1 worker(s) were killed due to the node running low on memory. Memory on the node"
    lost = (
        "The node with node id: 8f3e and address: 10.0.0.7 and node name: 10.0.0.7 has been "
        "marked dead because the detector has missed too many heartbeats from it."
    )
    found = notices([oom, "Started a local Ray instance.", lost])
    assert [n.split(":")[1].strip() for n in found] == [
        "Ray killed a process",
        "Ray lost a node of the cluster",
    ]
    assert notices(["A worker died or was killed while executing a task by an unexpected"]) == []


def test_rays_driver_loggers_write_to_the_log_not_the_console(run):
    log, shown, path = run
    console = io.StringIO()
    logger = logging.getLogger("ray.raymb_test_logger")
    handler = logging.StreamHandler(console)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        divert(logger)
        RayLog.current = log
        logger.warning("Token authentication is enabled for this Ray cluster.")
        RayLog.current = None  # no run: Ray's console again
        logger.warning("after the run")
    finally:
        logger.removeHandler(handler)
    assert console.getvalue() == "after the run\n"
    assert "Token authentication is enabled" in path.read_text()
    assert shown == []


def test_a_resumed_run_appends_to_its_log(tmp_path):
    run_dir = storage.resolve(str(tmp_path / "run"))
    for text in ("first", "second"):
        log = RayLog(run_dir, say=lambda line: None)
        log.forwarded(batch([text], actor="TrainController"))
        log.close()
    lines = (tmp_path / "run" / RAY_LOG).read_text().splitlines()
    assert [line for line in lines if not line.startswith("====")] == [
        "(TrainController pid=27781) first",
        "(TrainController pid=27781) second",
    ]


def test_a_bucket_runs_log_is_uploaded_when_it_ends(s3):
    fs = s3.bucket("logs-bucket")
    run_dir = storage.resolve("s3://logs-bucket/runs/r")
    (run_dir / "run.json").write_text("{}")  # the run exists
    log = RayLog(run_dir, say=lambda line: None)
    log.forwarded(batch(["Started training worker group of size 2"], actor="TrainController"))
    assert not (run_dir / RAY_LOG).exists()  # an object is written whole, at the end
    log.close()
    with fs.open_input_stream(f"logs-bucket/runs/r/{RAY_LOG}") as f:
        assert b"(TrainController pid=27781) Started training worker group" in f.read()


def test_a_discarded_bucket_run_gets_no_log(s3):
    s3.bucket("empty-bucket")
    run_dir = storage.resolve("s3://empty-bucket/runs/gone")
    log = RayLog(run_dir, say=lambda line: None)
    log.close()
    assert not run_dir.exists()


@pytest.mark.parametrize("flag", ["-v", "--verbose"])
def test_train_takes_verbose(flag, capsys):
    from raymb.cli import main

    assert main(["train", flag, "--print-config"]) == 0
    assert "[train]" in capsys.readouterr().out
