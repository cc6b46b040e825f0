"""The per-worker training loop: what each Ray Train worker runs, top to bottom.

next step's rows (raymb.feed) -> train_step -> a metrics entry; when a checkpoint is due
(checkpoint.every_steps, an epoch's end at least checkpoint.min_interval_s after the last,
the end): validate, then report with the checkpoint. Every rank checkpoints and gathers
metrics at the same steps: ray.train.report and the gathers are collectives.
"""

from __future__ import annotations

import os
import random
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raymb import checkpoint as ckpt
from raymb.config import Config
from raymb.errors import CheckpointError
from raymb.evaluate import batch_sums
from raymb.feed import train_source, val_batches
from raymb.metrics import Entry, Ledger
from raymb.models import build_model
from raymb.optim import build_optimizer, build_scheduler
from raymb.plan import Plan
from raymb.step import train_step
from raymb.sync import build_sync

POLL_ENV, POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 0.2
"""How often Ray Train's controller polls the workers: a report waits for the next poll (every
2 s by default, the whole cost of a checkpoint of a small model). The driver sets it."""


@dataclass
class Progress:
    """Counters that a checkpoint carries, so a resumed run continues where it stopped."""

    step: int = 0
    epoch: int = 0
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


def train_loop(payload: dict) -> None:
    config = Config.from_dict(payload["config"])
    plan = Plan(**payload["plan"])
    run_dir = Path(payload["run_dir"])
    faults = Faults(config, run_dir)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(config.train.seed)
    model = build_model(config.model, plan.in_features, plan.out_features).to(device)
    optimizer = build_optimizer(config.optim, model.parameters())
    scheduler = build_scheduler(config.optim, optimizer, plan.total_steps)
    sync = build_sync(config, world, device)
    progress = Progress()
    # Randomness after init (dropout, ...) differs between workers; a checkpoint carries
    # each worker's generator state, so a resumed run draws what an uninterrupted one would.
    torch.manual_seed(config.train.seed * 1000 + rank)
    random.seed(config.train.seed * 1000 + rank)
    restored = ray.train.get_checkpoint()
    saved_sync = None
    if restored is not None:
        with restored.as_directory() as directory:
            saved_sync = _restore(Path(directory), rank, model, optimizer, scheduler, progress)
        progress.resumed_from_steps.append(progress.step)
        if rank == 0:
            print(f"raymb: resumed from step {progress.step} (epoch {progress.epoch})", flush=True)
    net = sync.wrap(model)
    if saved_sync is not None:
        sync.load_state_dict(saved_sync)
    sync.comm.bytes = progress.bytes_allreduced
    features, label = config.data.features, config.data.label
    source = train_source(payload["train"], features, label, plan, rank, world)
    val_rows = max(plan.microbatch, 1024)
    val = val_batches(payload["val"], features, label, rank, world, val_rows)
    ledger = Ledger(run_dir / "metrics.csv" if rank == 0 else None, world, device)
    if ledger.csv is not None:
        ledger.csv.truncate_after(progress.step)  # rows a resumed run will write again
    # Skipping a step needs every worker's verdict each step; aborting is decided from the
    # losses when they are gathered, before any checkpoint.
    check_each_step = config.train.on_nan == "skip"
    # Under grad sync a checkpoint changes no number, so epoch-end ones can be thinned by time;
    # under param/diloco one averages the workers, so it stays tied to the step.
    floor_s = config.checkpoint.min_interval_s if config.train.sync == "grad" else 0.0
    last_checkpoint = time.monotonic()

    def gather() -> None:
        bad = ledger.gather()
        if bad is not None:
            raise FloatingPointError(
                f"raymb: non-finite loss or gradient at step {bad}; the last checkpoint is "
                "intact. Set train.on_nan=skip to drop such steps"
            )

    def report(with_checkpoint: bool) -> None:
        nonlocal last_checkpoint
        gather()
        progress.bytes_allreduced = sync.comm.bytes
        metrics = {
            **_row(progress, scheduler, sync),
            "train_loss": ledger.report_train_loss(),
            "train_seconds": progress.train_seconds,
            "resumed_from_steps": list(progress.resumed_from_steps),
            "stopped_early": progress.stopped_early,
        }
        if with_checkpoint and config.train.early_stopping.patience is not None:
            _early_stopping(progress, config, metrics)
            metrics["stopped_early"] = progress.stopped_early
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if with_checkpoint:
                _save(Path(tmp), rank, model, optimizer, scheduler, sync, progress, config, plan)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        last_checkpoint = time.monotonic()

    if _finished(progress, plan):  # a finished run started again: report where it ended
        report(with_checkpoint=False)
        return

    m = plan.microbatch
    while not _finished(progress, plan):
        steps = source.steps(progress.epoch, progress.step_in_epoch)
        while progress.step_in_epoch < plan.steps_per_epoch and not _finished(progress, plan):
            waited = time.perf_counter()
            x, y = next(steps)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            microbatches = [(x[i : i + m], y[i : i + m]) for i in range(0, len(y), m)]
            faults.before_step(progress.step + 1, rank, microbatches)
            started = time.perf_counter()
            rows = plan.rows_in_step(progress.step_in_epoch)
            loss, stepped = train_step(
                net,
                optimizer,
                microbatches,
                rows,
                sync=sync,
                classify=plan.classify,
                grad_clip=config.optim.grad_clip,
                bf16=config.train.precision == "bf16",
                check_finite=check_each_step,
            )
            progress.skipped_steps += not stepped
            scheduler.step()
            done = time.perf_counter()
            progress.train_seconds += done - waited
            progress.step += 1
            progress.step_in_epoch += 1
            progress.samples += rows * world

            epoch_end = progress.step_in_epoch == plan.steps_per_epoch
            if epoch_end:
                progress.epoch += 1
                progress.step_in_epoch = 0
            every = config.checkpoint.every_steps
            due = _finished(progress, plan) or bool(every and progress.step % every == 0)
            if epoch_end and not due:
                due = _agree(time.monotonic() - last_checkpoint >= floor_s, device)
            if due:
                sync.consolidate(net, optimizer)  # one model to validate and to save
                if val is not None:
                    # "Best by val_loss" needs a val_loss at every checkpoint.
                    progress.val_loss, progress.val_accuracy = _validate(model, val, plan, device)
            ledger.add(
                Entry(
                    row=_row(progress, scheduler, sync),
                    loss=loss if stepped else None,
                    rows=rows,
                    step_s=done - started,
                    wait_s=started - waited,
                    ended=done,
                    logged=due or progress.step % config.train.log_every == 0,
                )
            )
            if due:
                report(with_checkpoint=True)
            elif ledger.due:
                gather()
            if epoch_end:
                break


def _row(progress: Progress, scheduler, sync) -> dict:
    """The counters of a metrics row, as they stand after a step."""
    return {
        "step": progress.step,
        "epoch": progress.epoch,
        "val_loss": progress.val_loss,
        "val_accuracy": progress.val_accuracy,
        "lr": scheduler.get_last_lr()[0],
        "samples": progress.samples,
        "bytes_allreduced": sync.comm.bytes,
        "skipped_steps": progress.skipped_steps,
    }


def _agree(flag: bool, device) -> bool:
    """Rank 0's verdict, on every worker (a decision by the clock must not differ)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    box = torch.tensor([float(flag)], device=device)
    dist.broadcast(box, src=0)
    return bool(box.item())


class Faults:
    """fault.* for tests and drills: each fault fires once per run directory (a marker file
    records it), so the replacement worker trains on. A real kill can also lose the newest
    checkpoint if Ray Train's controller had not taken its report yet; the run then resumes,
    just as exactly, from the one before."""

    def __init__(self, config: Config, run_dir: Path) -> None:
        self.config, self.run_dir = config.fault, run_dir

    def before_step(self, step: int, rank: int, microbatches: list) -> None:
        if rank != self.config.rank:
            return
        if step == self.config.kill_worker_at_step and self._first(f"kill-at-step-{step}"):
            # A report waits in a queue until Ray Train's controller polls the workers; give
            # it time to take the latest checkpoint, so the drill resumes from a known step.
            time.sleep(5 * float(os.environ.get(POLL_ENV, 2.0)))
            print(f"raymb: fault.kill_worker_at_step={step}: killing rank {rank}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.config.nan_at_step and self._first(f"nan-at-step-{step}"):
            x, y = microbatches[0]
            microbatches[0] = (x * float("nan"), y)

    def _first(self, name: str) -> bool:
        try:
            (self.run_dir / f".fault-{name}").touch(exist_ok=False)
            return True
        except FileExistsError:
            return False


def _early_stopping(progress: Progress, config: Config, metrics: dict) -> None:
    """Count checkpoints without improvement of checkpoint.metric; every worker sees the same
    all-reduced numbers, so all stop together."""
    value = metrics.get(config.checkpoint.metric)
    if value is None:
        return
    sign = 1.0 if config.checkpoint.mode == "min" else -1.0
    rule = config.train.early_stopping
    if progress.best is None or sign * (progress.best - value) > rule.min_delta:
        progress.best, progress.since_best = value, 0
    else:
        progress.since_best += 1
        progress.stopped_early = progress.since_best >= rule.patience


def _finished(progress: Progress, plan: Plan) -> bool:
    return (
        progress.stopped_early
        or progress.epoch >= plan.epochs
        or (plan.max_steps is not None and progress.step >= plan.max_steps)
    )


@torch.no_grad()
def _validate(model, batches, plan: Plan, device) -> tuple[float | None, float | None]:
    """Mean loss (and accuracy for classifiers) over the validation set, all workers."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in batches:
        sums += batch_sums(model, x.to(device), y.to(device), plan.classify)
    model.train()
    loss, hits, rows = _all_sum(sums).tolist()
    if rows == 0:
        return None, None
    return loss / rows, (hits / rows if plan.classify else None)


def _all_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _save(directory, rank, model, optimizer, scheduler, sync, progress, config, plan) -> None:
    """This worker's part of a checkpoint; Ray merges the workers' files into one directory.

    model.pt and state.pt come from rank 0; worker-<rank>.pt from every worker: its random
    generators and, where workers' optimizer states differ (param, diloco), its own.
    """
    if rank == 0:
        model_payload = ckpt.model_payload(
            model, config.to_dict(), plan.in_features, plan.out_features, plan.classify
        )
        ckpt.atomic_save(model_payload, directory / ckpt.MODEL_FILE)
        state = {
            "format": "raymb",
            "workers": plan.workers,
            "optimizer": None if sync.per_worker_optimizer else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "sync": sync.state_dict(),
            "progress": asdict(progress),
        }
        ckpt.atomic_save(state, directory / ckpt.STATE_FILE)
    worker = {
        "format": "raymb",
        "optimizer": optimizer.state_dict() if sync.per_worker_optimizer else None,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python_rng": random.getstate(),
    }
    ckpt.atomic_save(worker, directory / _worker_file(rank))


def _worker_file(rank: int) -> str:
    return f"worker-{rank}.pt"


def _restore(directory: Path, rank, model, optimizer, scheduler, progress: Progress) -> dict:
    """Load a checkpoint into this worker; return the sync strategy's saved state."""
    payload = ckpt.read(directory / ckpt.MODEL_FILE)
    name = payload["config"]["model"]["name"]
    ckpt.load_state(model, payload["state_dict"], directory / ckpt.MODEL_FILE, name)
    state = ckpt.read(directory / ckpt.STATE_FILE)
    world = ray.train.get_context().get_world_size()
    if state["workers"] != world:
        raise CheckpointError(
            f"{directory}: written by {state['workers']} workers; resume it with "
            f"scale.workers={state['workers']} (or start a new run.name)"
        )
    worker = ckpt.read(directory / _worker_file(rank))
    optimizer.load_state_dict(state["optimizer"] or worker["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for key, value in state["progress"].items():
        setattr(progress, key, value)
    torch.set_rng_state(worker["torch_rng"])
    if worker["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(worker["cuda_rng"])
    random.setstate(worker["python_rng"])
    return state["sync"]
