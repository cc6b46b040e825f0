"""raymb.driver.launch.run_torch: the plain torch.distributed group the numerics tests, the
sweeps' references, `bench` and `raymb train --local` run raymb's loops on; and the
TorchSession's checkpoints: pruned as Ray Train prunes, and found beside Ray Train's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from raymb.driver.launch import WorkerFailed, run_torch
from raymb.rundir.runs import COMPLETE, newest_checkpoint, saved_checkpoints
from raymb.worker.session import TorchSession


def _threads(out: Path, *, session_factory) -> None:
    rank = int(os.environ["RANK"])
    (out / str(rank)).write_text(str(torch.get_num_threads()))


def test_each_process_takes_its_share_of_the_cores(tmp_path, monkeypatch):
    # As Ray gives a worker its CPUs: 2 processes of all-core thread pools on 2 cores made
    # the digits mlp's steps 7x slower.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    run_torch(_threads, (tmp_path,), 2)
    share = max(1, (os.cpu_count() or 1) // 2)
    assert [int((tmp_path / str(r)).read_text()) for r in range(2)] == [share, share]


def _report(session: TorchSession, step: int, val_loss: float | None, tmp: Path) -> None:
    files = tmp / f"files-{step}"
    files.mkdir()
    (files / "model.pt").write_bytes(b"m")
    session.report({"step": step, "val_loss": val_loss}, files)


def _complete(run_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in run_dir.glob(f"checkpoint_*/{COMPLETE}"))


def test_the_torch_session_keeps_the_best_and_the_latest_as_ray_train_does(tmp_path):
    run_dir = tmp_path / "run"
    session = TorchSession(run_dir, device=torch.device("cpu"), keep=2, metric="val_loss")
    for step, loss in [(10, 0.5), (20, 0.2), (30, 0.4), (40, None), (50, 0.9)]:
        _report(session, step, loss, tmp_path)
    # The best two by val_loss (20, 30); the latest (50) always; 40 has no val_loss: the worst.
    assert _complete(run_dir) == [
        "checkpoint_00000020",
        "checkpoint_00000030",
        "checkpoint_00000050",
    ]
    kept = saved_checkpoints(run_dir)
    assert [(c.step, c.metrics["val_loss"], c.by_ray) for c in kept] == [
        (20, 0.2, False),
        (30, 0.4, False),
        (50, 0.9, False),
    ]
    assert session.latest() == run_dir / "checkpoint_00000050"
    assert [r["step"] for r in session.reports] == [10, 20, 30, 40, 50]


def test_either_session_resumes_from_the_newest_checkpoint_whichever_launcher_wrote_it(tmp_path):
    run_dir = tmp_path / "run"
    session = TorchSession(run_dir, device=torch.device("cpu"))
    _report(session, 40, 0.3, tmp_path)
    ray_dir = "checkpoint_2026-12-07_10-00-00.000000"
    (run_dir / ray_dir).mkdir()

    def snapshot(step: int) -> None:
        result = {"checkpoint_dir_name": ray_dir, "metrics": {"step": step, "val_loss": 0.1}}
        record = {"checkpoint_results": [result], "latest_checkpoint_result": result}
        (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps(record))

    snapshot(60)  # Ray Train trained on from the torch session's step 40
    assert session.latest() == run_dir / ray_dir
    assert newest_checkpoint(run_dir, by_ray=False).step == 40
    snapshot(30)  # Ray's is older: a run trained on Ray, then with --local
    assert session.latest() == run_dir / "checkpoint_00000040"
    assert [(c.step, c.by_ray) for c in saved_checkpoints(run_dir)] == [(30, True), (40, False)]
    # An unfinished checkpoint (no .complete) is not one; nor is a folder Ray has not registered.
    (run_dir / "checkpoint_00000090").mkdir()
    (run_dir / "checkpoint_2026-12-08_10-00-00.000000").mkdir()
    assert session.latest() == run_dir / "checkpoint_00000040"


def _fails_on_rank_1(out: Path, *, session_factory) -> str:
    if int(os.environ["RANK"]) == 1:
        raise ValueError("rank 1 gives up")
    import torch.distributed as dist

    dist.barrier()  # waits for rank 1 forever: the launcher ends it
    return "unreachable"


def test_a_process_that_raises_ends_the_group_with_its_error(tmp_path):
    with pytest.raises(WorkerFailed) as failed:
        run_torch(_fails_on_rank_1, (tmp_path,), 2)
    assert str(failed.value).splitlines()[-1] == "ValueError: rank 1 gives up"
    assert "worker rank 1" in str(failed.value)
