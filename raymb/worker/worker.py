"""What every worker of raymb holds, whichever loop drives it (epochs or --follow).

`Worker` builds the model, optimizer, scheduler and sync strategy, restores them from the
run's latest checkpoint, takes steps, keeps their metrics (raymb.worker.metrics) and, when the
loop says a checkpoint is due, validates and reports one. The loops (raymb.worker.epochs for epochs,
raymb.worker.follow for arriving files) decide only which rows each step trains on and when.
What it needs of the runtime (rank, device, the latest checkpoint, reports) it asks of its
session (raymb.worker.session): Ray Train, or a plain torch.distributed group.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raymb.config import Config
from raymb.core.loss import batch_sums, lm_metrics
from raymb.core.noise import NoiseScale
from raymb.core.optim import build_optimizer, build_scheduler
from raymb.core.step import train_step
from raymb.core.sync import build_sync
from raymb.errors import CheckpointError
from raymb.models import build_model
from raymb.rundir import checkpoint as ckpt
from raymb.rundir.storage import Location
from raymb.worker.feed import Batch
from raymb.worker.metrics import Entry, Ledger
from raymb.worker.session import Session
from raymb.worker.spec import Shape

POLL_ENV, POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 0.2
"""How often Ray Train's controller polls the workers: a report waits for the next poll (every
2 s by default, the whole cost of a checkpoint of a small model). The driver sets it."""
STOP_FILE = "STOP"
"""In the run directory: the driver writes it on the first Ctrl-C or SIGTERM (anyone may touch
it); the workers then checkpoint at the next step (epochs) or after the file in hand
(--follow) and return."""
STOP_LOOK_S = {True: 0.5, False: 5.0}
"""How often rank 0 looks for the stop file, locally and in an object store (a request)."""


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


class Worker:
    def __init__(
        self,
        config: Config,
        shape: Shape,
        run_dir: Location,
        *,
        mode: str,
        total_steps: int,
        session: Session,
        val: Any = None,
        epoch_steps: int | None = None,
    ) -> None:
        """`epoch_steps`: an epoch's steps, when fewer than train.log_every the window of the
        reports' train_loss (raymb.worker.metrics)."""
        self.config, self.shape, self.mode, self.val = config, shape, mode, val
        self.session = session
        self.rank, self.world = session.rank, session.world
        self.device = device = session.device
        self.nodes = _count_nodes(session)
        if config.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(config.train.seed)
        self.model = build_model(config.model, shape.inputs.model_shape, shape.out_features)
        self.model.to(device)
        self.optimizer = build_optimizer(config.optim, self.model.parameters())
        self.scheduler = build_scheduler(config.optim, self.optimizer, total_steps)
        self.sync = build_sync(config, self.world, device)
        self.progress = Progress()
        # Randomness after init (dropout, ...) differs between workers; a checkpoint carries
        # each worker's generator state, so a resumed run draws what an uninterrupted one would.
        torch.manual_seed(config.train.seed * 1000 + self.rank)
        random.seed(config.train.seed * 1000 + self.rank)
        saved_sync = None
        with session.restored() as directory:
            if directory is not None:
                saved_sync = self._restore(directory)
                self.progress.resumed_from_steps.append(self.progress.step)
        self.net = self.sync.wrap(self.model)
        if saved_sync is not None:
            self.sync.load_state_dict(saved_sync)
        self.sync.comm.bytes = self.progress.bytes_allreduced
        csv_path = run_dir / "metrics.csv" if self.rank == 0 else None
        noise = NoiseScale.from_state(self.progress.noise) if config.train.noise_scale else None
        self.ledger = Ledger(
            csv_path,
            self.world,
            device,
            log_every=config.train.log_every,
            window=epoch_steps,
            recent=self.progress.recent_losses,
            noise=noise,
        )
        if self.ledger.csv is not None:
            self.ledger.csv.truncate_after(self.progress.step)  # rows a resume writes again
        # Skipping a step needs every worker's verdict each step; aborting is decided from the
        # losses when they are gathered, before any checkpoint.
        self.check_each_step = config.train.on_nan == "skip"
        self.last_checkpoint = time.monotonic()
        self.stop_file: Location | None = None
        """Where rank 0 looks for the driver's stop request (the loop sets it)."""
        self.stop_requested = False
        """The driver asked to stop: every worker learns it at the same gather."""
        self._looked = -float("inf")
        self.measured = None
        """train.noise_scale: the last step's norms, until record() hands them on."""

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove what the worker keeps outside the run directory (metrics.csv's local copy
        for an object store): a loop's `with Worker(...)` calls it when the loop ends, and
        Ray ends the process after, running no finalizer."""
        if self.ledger.csv is not None:
            self.ledger.csv.close()

    @property
    def resumed(self) -> bool:
        return bool(self.progress.resumed_from_steps)

    def step(self, microbatches: list[Batch], rows: int, *, uneven: bool = False):
        """One optimizer step on this worker's `rows`; returns (its summed loss, whether the
        step was taken, seconds).
        `uneven`: the workers' rows in this step may differ (their sum is all-reduced)."""
        started = time.perf_counter()
        loss, taken = train_step(
            self.net,
            self.optimizer,
            microbatches,
            rows * self.shape.inputs.units_per_row,  # the loss is a mean over tokens for lm
            sync=self.sync,
            classify=self.shape.classify,
            grad_clip=self.config.optim.grad_clip,
            bf16=self.config.train.precision == "bf16",
            check_finite=self.check_each_step,
            uneven=uneven,
            l1=self.config.optim.l1,
        )
        self.scheduler.step()
        self.measured = self._take_noise()
        self.progress.skipped_steps += not taken
        self.progress.step += 1
        return loss, taken, time.perf_counter() - started

    def _take_noise(self):
        """train.noise_scale: the step's norms (raymb.core.sync.NoiseProbe.take), with 1/B in
        rows rather than tokens for lm: the estimate is a number of rows."""
        measured = getattr(self.sync, "measured", None)
        if measured is None:
            return None
        self.sync.measured = None
        squares, (parts, inverse, inverse_big) = measured
        units = self.shape.inputs.units_per_row
        return squares, (parts, inverse * units, inverse_big * units)

    def record(self, loss, taken: bool, rows: int, *, step_s: float, wait_s: float, due: bool):
        """Keep the step's metrics (`rows`: the step's rows on all workers); when `due`,
        validate and checkpoint (a collective: every worker passes the same `due`)."""
        progress = self.progress
        progress.samples += rows
        progress.train_seconds += step_s + wait_s
        if due:
            self.sync.consolidate(self.net, self.optimizer)  # one model to validate and save
            if self.val is not None:
                # "Best by val_loss" needs a val_loss at every checkpoint.
                progress.val_loss, progress.val_accuracy = self.validate()
        self.ledger.add(
            Entry(
                row=self._row(),
                loss=loss if taken else None,
                rows=rows,
                units=rows * self.shape.inputs.units_per_row,
                step_s=step_s,
                wait_s=wait_s,
                ended=time.perf_counter(),
                logged=due or progress.step % self.config.train.log_every == 0,
                noise=self.measured if taken else None,
            )
        )
        self.measured = None
        if due:
            self.report(with_checkpoint=True)
        elif self.ledger.due:
            self.gather()

    def epoch_end_due(self) -> bool:
        """Whether an epoch's end checkpoints: at least checkpoint.min_interval_s after the
        last one under grad sync (where a checkpoint changes no number), always otherwise."""
        floor = self.config.checkpoint.min_interval_s if self.config.train.sync == "grad" else 0
        return self._agree(time.monotonic() - self.last_checkpoint >= floor)

    def gather(self) -> None:
        # Rank 0's look for the stop file rides on the gather's all-reduce: no collective of
        # its own, and every worker sees the request at the same step.
        bad, stop = self.ledger.gather(self._stop_file_seen())
        self.stop_requested = self.stop_requested or stop
        if bad is not None:
            raise FloatingPointError(
                f"raymb: non-finite loss or gradient at step {bad}; the last checkpoint is "
                "intact. Set train.on_nan=skip to drop such steps"
            )

    def _stop_file_seen(self) -> bool:
        """Rank 0: whether the stop file is there, looked for at most every STOP_LOOK_S."""
        if self.stop_file is None or self.rank != 0:
            return False
        now = time.monotonic()
        if now - self._looked < STOP_LOOK_S[self.stop_file.local]:
            return False
        self._looked = now
        return self.stop_file.exists()

    def report(self, *, with_checkpoint: bool) -> None:
        self.gather()
        progress = self.progress
        progress.bytes_allreduced = self.sync.comm.bytes
        metrics = {
            **self._row(),
            "train_loss": self.ledger.train_loss(),
            "train_seconds": progress.train_seconds,
            "resumed_from_steps": list(progress.resumed_from_steps),
            "stopped_early": progress.stopped_early,
            "nodes": self.nodes,
        }
        if self.ledger.noise is not None:
            metrics["grad_noise_scale"] = self.ledger.noise.value
            progress.noise = self.ledger.noise.state()
        if with_checkpoint and self.config.train.early_stopping.patience is not None:
            self._early_stopping(metrics)
            metrics["stopped_early"] = progress.stopped_early
        if self.ledger.csv is not None:
            self.ledger.csv.flush()  # the rows up to this checkpoint, in storage before it
        progress.recent_losses = self.ledger.recent_state()
        with tempfile.TemporaryDirectory() as tmp:
            if with_checkpoint:
                self._save(Path(tmp))
            self.session.report(metrics, Path(tmp) if with_checkpoint else None)
        self.last_checkpoint = time.monotonic()

    @torch.no_grad()
    def validate(self) -> tuple[float | None, float | None]:
        """Mean loss (and accuracy for classifiers) over the validation set, all workers: per
        token for lm."""
        model, device, classify = self.model, self.device, self.shape.classify
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for x, y in self.val:
            x, y = self.shape.inputs.collate(x.to(device), y.to(device))
            sums += batch_sums(model, x, y, classify)
        model.train()
        loss, hits, rows = all_sum(sums).tolist()
        if rows == 0:
            return None, None
        return loss / rows, (hits / rows if classify else None)

    def _row(self) -> dict:
        """The counters of a metrics row, as they stand after a step."""
        p = self.progress
        return {
            "step": p.step,
            "epoch": p.epoch,
            "val_loss": p.val_loss,
            "val_accuracy": p.val_accuracy,
            **lm_metrics(p.val_loss, self.shape.inputs.task, self.shape.tokenizer),
            "lr": self.scheduler.get_last_lr()[0],
            "samples": p.samples,
            "bytes_allreduced": self.sync.comm.bytes,
            "skipped_steps": p.skipped_steps,
            "workers": self.world,
        }

    def _agree(self, flag: bool) -> bool:
        """Rank 0's verdict, on every worker (a decision by the clock must not differ)."""
        if self.world == 1:
            return flag
        box = torch.tensor([float(flag)], device=self.device)
        dist.broadcast(box, src=0)
        return bool(box.item())

    def _early_stopping(self, metrics: dict) -> None:
        """Count checkpoints without improvement of checkpoint.metric; every worker sees the
        same all-reduced numbers, so all stop together."""
        value = metrics.get(self.config.checkpoint.metric)
        if value is None:
            return
        progress, rule = self.progress, self.config.train.early_stopping
        sign = 1.0 if self.config.checkpoint.mode == "min" else -1.0
        if progress.best is None or sign * (progress.best - value) > rule.min_delta:
            progress.best, progress.since_best = value, 0
        else:
            progress.since_best += 1
            progress.stopped_early = progress.since_best >= rule.patience

    def _save(self, directory: Path) -> None:
        """This worker's part of a checkpoint; Ray merges the workers' files into one directory.

        model.pt and state.pt come from rank 0; worker-<rank>.pt from every worker: its random
        generators and, where workers' optimizer states differ (param, diloco), its own.
        """
        shape, sync, optimizer = self.shape, self.sync, self.optimizer
        if self.rank == 0:
            model_payload = ckpt.model_payload(
                self.model,
                self.config.to_dict(),
                shape.in_features,
                shape.out_features,
                shape.classify,
                inputs=shape.inputs.to_dict(),
                tokenizer=shape.tokenizer,
            )
            ckpt.atomic_save(model_payload, directory / ckpt.MODEL_FILE)
            state = {
                "format": "raymb",
                "mode": self.mode,
                "workers": self.world,
                "optimizer": None if sync.per_worker_optimizer else optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "sync": sync.state_dict(),
                "progress": asdict(self.progress),
            }
            ckpt.atomic_save(state, directory / ckpt.STATE_FILE)
        worker = {
            "format": "raymb",
            "optimizer": optimizer.state_dict() if sync.per_worker_optimizer else None,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(),
        }
        ckpt.atomic_save(worker, directory / _worker_file(self.rank))

    def _restore(self, directory: Path) -> dict:
        """Load a checkpoint into this worker; return the sync strategy's saved state."""
        payload = ckpt.read(directory / ckpt.MODEL_FILE)
        name = payload["config"]["model"]["name"]
        ckpt.load_state(self.model, payload["state_dict"], directory / ckpt.MODEL_FILE, name)
        state = ckpt.read(directory / ckpt.STATE_FILE)
        if state.get("mode", "epochs") != self.mode:
            how = "with --follow" if state.get("mode") == "follow" else "without --follow"
            raise CheckpointError(f"{directory}: this run was started {how}; use another run.name")
        written_by = state["workers"]
        if written_by != self.world and self.rank == 0:
            print(
                f"raymb: resuming on {self.world} worker(s) a run checkpointed by {written_by}",
                flush=True,
            )
        # A resize: under grad sync the optimizer state is one for all and the steps' rows do
        # not depend on W, so nothing changes. Per-worker state (param, diloco) of a new
        # worker r comes from worker r mod W_old; a new worker's random generators keep the
        # seed of its rank.
        worker = ckpt.read(directory / _worker_file(self.rank % written_by))
        self.optimizer.load_state_dict(state["optimizer"] or worker["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for key, value in state["progress"].items():
            setattr(self.progress, key, value)
        if self.rank < written_by:
            torch.set_rng_state(worker["torch_rng"])
            if worker["cuda_rng"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(worker["cuda_rng"])
            random.setstate(worker["python_rng"])
        return state["sync"]


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _count_nodes(session: Session) -> int:
    """How many nodes the workers run on (by node id: nodes may share an address)."""
    if session.world == 1:
        return 1
    node = session.node_id()
    ids: list = [None] * session.world
    dist.all_gather_object(ids, node)
    return len(set(ids))


def fault_wait_s() -> float:
    """Long enough for Ray Train's controller to take the latest report."""
    return 5 * float(os.environ.get(POLL_ENV, 2.0))


def _worker_file(rank: int) -> str:
    return f"worker-{rank}.pt"
