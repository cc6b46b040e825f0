"""When a checkpoint is due, what it holds, and how a worker resumes from one.

The rule (`Checkpointer.due`, as torchtitan's CheckpointManager._should_save): the run's last
step, the step after the driver asked to stop, every checkpoint.every_steps steps, and an
epoch's end at least checkpoint.min_interval_s after the last checkpoint under grad sync
(where skipping one changes no number; always under param and diloco, where a checkpoint
averages the workers). --follow checkpoints after each file, which the checkpoint records,
and at no other step. Every worker must reach the same verdict at the same step: the report
is a collective, so a verdict by the clock is rank 0's, broadcast.

A checkpoint is model.pt and state.pt from rank 0 and worker-<rank>.pt from every worker; the
session (raymb.worker.session) merges the workers' files into one directory.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from raymb.config import Config
from raymb.errors import CheckpointError
from raymb.rundir import checkpoint as ckpt
from raymb.worker.session import Session

if TYPE_CHECKING:
    from raymb.worker.worker import Worker


@dataclass
class Progress:
    """Counters that a checkpoint carries, so a resumed run continues where it stopped."""

    step: int = 0
    epoch: int = 0
    """Epochs done; with --follow, files consumed."""
    step_in_epoch: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    bytes_allreduced: int = 0
    resumed_from_steps: list[int] = field(default_factory=list)
    skipped_steps: int = 0
    """Steps dropped on every worker for a non-finite loss (train.on_nan = "skip")."""
    val_loss: float | None = None
    val_accuracy: float | None = None
    val_metrics: dict[str, float | None] = field(default_factory=dict)
    """metrics.name's metrics at the last validation, as val_<metric>."""
    best: float | None = None
    """Best checkpoint.metric so far, and validations since it improved (early stopping)."""
    since_best: int = 0
    stopped_early: bool = False
    files: list[list] = field(default_factory=list)
    """--follow: [name, rows] of every file trained on, in order."""
    recent_losses: list[list] = field(default_factory=list)
    """[step, loss summed over all workers, units] of the last train.log_every steps: the
    metrics rows and train_loss of a resumed run reach back past the resume."""
    noise: list[float] = field(default_factory=list)
    """train.noise_scale: the moving averages (raymb.core.noise.NoiseScale.state)."""


class Checkpointer:
    """The checkpoint rule and the save; `mode` ("epochs", "follow", "lr-find") is recorded
    in state.pt (raymb.worker.checkpointer.restore checks it)."""

    def __init__(
        self,
        config: Config,
        session: Session,
        *,
        mode: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config, self.session, self.mode, self.clock = config, session, mode, clock
        self.every_steps = config.checkpoint.every_steps if mode == "epochs" else None
        grad = config.train.sync == "grad"
        self.min_interval_s = config.checkpoint.min_interval_s if grad else 0.0
        self.last = clock()
        """When the last report went out (a checkpoint's, or the report of a finished run)."""

    def due(
        self, step: int, *, end: bool = False, stop: bool = False, epoch_end: bool = False
    ) -> bool:
        """Whether the step just taken (the run's `step`-th) checkpoints. `end`: the run's
        last step, or --follow's last step of a file; `stop`: the driver asked to stop."""
        if end or stop or (self.every_steps and step % self.every_steps == 0):
            return True
        return epoch_end and self._agree(self.clock() - self.last >= self.min_interval_s)

    def report(self, metrics: dict[str, Any], worker: Worker | None) -> None:
        """Report `metrics` to the session, with this worker's part of a checkpoint when
        `worker` is given (a collective: every worker reports at the same step)."""
        with tempfile.TemporaryDirectory() as tmp:
            if worker is not None:
                self.save(worker, Path(tmp))
            self.session.report(metrics, Path(tmp) if worker is not None else None)
        self.last = self.clock()

    def save(self, worker: Worker, directory: Path) -> None:
        """This worker's part of a checkpoint: model.pt and state.pt from rank 0;
        worker-<rank>.pt from every worker: its random generators and, where workers'
        optimizer states differ (param, diloco), its own."""
        shape, sync, optimizer = worker.shape, worker.sync, worker.optimizer
        if self.session.rank == 0:
            ema = worker.ema
            # train.ema_decay: model.pt holds the average (what eval, predict and export
            # read), state.pt the weights training goes on from, and the average's state.
            weights = None if ema is None else _copy(worker.model.state_dict())
            with worker.averaged():
                model_payload = ckpt.model_payload(
                    worker.model,
                    self.config.to_dict(),
                    shape.in_features,
                    shape.out_features,
                    shape.classify,
                    inputs=shape.inputs.to_dict(),
                    tokenizer=shape.tokenizer,
                    given=worker.given,
                )
                if ema is not None:
                    model_payload["ema_decay"] = ema.decay  # the weights are the average
                ckpt.atomic_save(model_payload, directory / ckpt.MODEL_FILE)
            state = {
                "format": "raymb",
                "mode": self.mode,
                "workers": self.session.world,
                "optimizer": None if sync.per_worker_optimizer else optimizer.state_dict(),
                "scheduler": worker.scheduler.state_dict(),
                "sync": sync.state_dict(),
                "progress": asdict(worker.progress),
                "weights": weights,
                "ema": None if ema is None else ema.state_dict(),
            }
            ckpt.atomic_save(state, directory / ckpt.STATE_FILE)
        own = {
            "format": "raymb",
            "optimizer": optimizer.state_dict() if sync.per_worker_optimizer else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(),
        }
        ckpt.atomic_save(own, directory / worker_file(self.session.rank))

    def _agree(self, flag: bool) -> bool:
        """Rank 0's verdict, on every worker (a decision by the clock must not differ)."""
        if self.session.world == 1:
            return flag
        box = torch.tensor([float(flag)], device=self.session.device)
        dist.broadcast(box, src=0)
        return bool(box.item())


def restore(worker: Worker, directory: Path, mode: str) -> dict:
    """Load a checkpoint into `worker`; return the sync strategy's saved state. A run resumes
    only in the mode (epochs, --follow) it was started in."""
    rank, world = worker.rank, worker.world
    payload = ckpt.read(directory / ckpt.MODEL_FILE)
    name = payload["config"]["model"]["name"]
    ckpt.load_state(worker.model, payload["state_dict"], directory / ckpt.MODEL_FILE, name)
    state = ckpt.read(directory / ckpt.STATE_FILE)
    if state.get("weights") is not None:  # model.pt held the EMA: train on from the weights
        worker.model.load_state_dict(state["weights"])
    if state.get("ema") is not None and worker.ema is not None:
        worker.ema.load_state_dict(state["ema"], worker.device)
    if state.get("mode", "epochs") != mode:
        how = "with --follow" if state.get("mode") == "follow" else "without --follow"
        raise CheckpointError(f"{directory}: this run was started {how}; use another run.name")
    written_by = state["workers"]
    if written_by != world and rank == 0:
        print(
            f"raymb: resuming on {world} worker(s) a run checkpointed by {written_by}",
            flush=True,
        )
    # A resize: under grad sync the optimizer state is one for all and the steps' rows do
    # not depend on W, so nothing changes. Per-worker state (param, diloco) of a new
    # worker r comes from worker r mod W_old; a new worker's random generators keep the
    # seed of its rank.
    own = ckpt.read(directory / worker_file(rank % written_by))
    worker.optimizer.load_state_dict(state["optimizer"] or own["optimizer"])
    worker.scheduler.load_state_dict(state["scheduler"])
    for key, value in state["progress"].items():
        setattr(worker.progress, key, value)
    if rank < written_by:
        torch.set_rng_state(own["torch_rng"])
        if own["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(own["cuda_rng"])
        random.setstate(own["python_rng"])
    return state["sync"]


def _copy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state_dict.items()}


def worker_file(rank: int) -> str:
    return f"worker-{rank}.pt"
