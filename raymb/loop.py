"""The per-worker training loop: what each Ray Train worker runs, top to bottom.

train_step -> report (metrics, and a checkpoint when due) -> validate at each epoch's end.
Every rank reports at the same steps: ray.train.report is a barrier.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.data.collate_fn import ArrowBatchCollateFn

from raymb import checkpoint as ckpt
from raymb.columns import table_to_tensors
from raymb.config import Config
from raymb.models import build_model, correct, summed_loss
from raymb.optim import build_optimizer, build_scheduler
from raymb.plan import Plan
from raymb.step import train_step
from raymb.sync import build_sync


class Collate(ArrowBatchCollateFn):
    """Arrow batch -> (features, label) tensors, in Ray Data's prefetch threads."""

    def __init__(self, features: str | list[str], label: str) -> None:
        self.features, self.label = features, label

    def __call__(self, batch):
        return table_to_tensors(batch, self.features, self.label)


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
    val_loss: float | None = None
    val_accuracy: float | None = None


class Window:
    """Sums between two reports, turned into one row of metrics."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.rows = 0
        self.steps = 0
        self.step_s = 0.0
        self.wait_s = 0.0
        self.started = time.perf_counter()


def train_loop(payload: dict) -> None:
    config = Config.from_dict(payload["config"])
    plan = Plan(**payload["plan"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(config.train.seed)
    model = build_model(config.model, plan.in_features, plan.out_features).to(device)
    optimizer = build_optimizer(config.optim, model.parameters())
    scheduler = build_scheduler(config.optim, optimizer, plan.total_steps)
    progress = Progress()
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            _restore(Path(directory), model, optimizer, scheduler, progress)
        progress.resumed_from_steps.append(progress.step)
        if rank == 0:
            print(f"raymb: resumed from step {progress.step} (epoch {progress.epoch})", flush=True)
    # Randomness after init (dropout, ...) depends only on (seed, rank, step): a resumed run
    # draws what an uninterrupted one would have.
    torch.manual_seed(config.train.seed * 1000 + rank + progress.step)

    sync = build_sync(config.train.sync, world, device)
    sync.bytes_allreduced = progress.bytes_allreduced
    net = sync.wrap(model)
    collate = Collate(config.data.features, config.data.label)
    train_data = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val") if payload["has_val"] else None
    window = Window(device)

    def report(with_checkpoint: bool) -> None:
        loss, rows = _all_sum(torch.stack([window.loss.float(), _t(window.rows, device)]))
        elapsed = time.perf_counter() - window.started
        metrics = {
            "step": progress.step,
            "epoch": progress.epoch,
            "train_loss": (loss / rows).item() if rows else float("nan"),
            "val_loss": progress.val_loss,
            "val_accuracy": progress.val_accuracy,
            "lr": scheduler.get_last_lr()[0],
            "samples": progress.samples,
            "samples_per_s": rows.item() / elapsed if elapsed > 0 else 0.0,
            "step_time_s": window.step_s / max(1, window.steps),
            "data_wait_s": window.wait_s / max(1, window.steps),
            "bytes_allreduced": sync.bytes_allreduced,
            "train_seconds": progress.train_seconds,
            "resumed_from_steps": list(progress.resumed_from_steps),
        }
        progress.bytes_allreduced = sync.bytes_allreduced
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if with_checkpoint and rank == 0:
                state = _state(model, optimizer, scheduler, progress, config, plan)
                ckpt.atomic_save(state["model"], Path(tmp) / ckpt.MODEL_FILE)
                ckpt.atomic_save(state["train"], Path(tmp) / ckpt.STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        window.reset()

    if _finished(progress, plan):  # a finished run started again: report where it ended
        report(with_checkpoint=False)
        return

    while not _finished(progress, plan):
        batches = iter(
            train_data.iter_torch_batches(
                batch_size=plan.microbatch, collate_fn=collate, prefetch_batches=2
            )
        )
        for _ in range(progress.step_in_epoch * plan.step_rows // plan.microbatch):
            next(batches)  # microbatches this epoch already trained on before the resume
        while progress.step_in_epoch < plan.steps_per_epoch and not _finished(progress, plan):
            waited = time.perf_counter()
            microbatches = [
                (x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                for x, y in (
                    next(batches) for _ in range(plan.microbatches_in_step(progress.step_in_epoch))
                )
            ]
            started = time.perf_counter()
            rows = plan.rows_in_step(progress.step_in_epoch)
            loss = train_step(
                net,
                optimizer,
                microbatches,
                rows * world,
                sync=sync,
                classify=plan.classify,
                grad_clip=config.optim.grad_clip,
            )
            scheduler.step()
            done = time.perf_counter()
            window.loss += loss
            window.rows += rows
            window.steps += 1
            window.wait_s += started - waited
            window.step_s += done - started
            progress.train_seconds += done - waited
            progress.step += 1
            progress.step_in_epoch += 1
            progress.samples += rows * world

            epoch_end = progress.step_in_epoch == plan.steps_per_epoch
            if epoch_end:
                if next(batches, None) is not None:
                    raise RuntimeError("raymb: the step plan missed rows of this worker's shard")
                progress.epoch += 1
                progress.step_in_epoch = 0
            every = config.checkpoint.every_steps
            due = epoch_end or _finished(progress, plan) or (every and progress.step % every == 0)
            if due and val_data is not None:
                # Each epoch's end, and every checkpoint: "best by val_loss" needs a val_loss.
                progress.val_loss, progress.val_accuracy = _validate(
                    net, val_data, collate, plan, device
                )
            if due or progress.step % config.train.log_every == 0:
                report(with_checkpoint=bool(due))
            if epoch_end:
                break  # the next epoch needs a new iterator over the shard


def _finished(progress: Progress, plan: Plan) -> bool:
    return progress.epoch >= plan.epochs or (
        plan.max_steps is not None and progress.step >= plan.max_steps
    )


@torch.no_grad()
def _validate(model, data, collate, plan: Plan, device) -> tuple[float, float | None]:
    """Mean loss (and accuracy for classifiers) over the validation set, all workers."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in data.iter_torch_batches(batch_size=max(plan.microbatch, 1024), collate_fn=collate):
        x, y = x.to(device), y.to(device)
        out = model(x)
        sums[0] += summed_loss(out, y, plan.classify).double()
        sums[1] += correct(out, y).double() if plan.classify else 0.0
        sums[2] += len(y)
    model.train()
    loss, hits, rows = _all_sum(sums).tolist()
    if rows == 0:
        return None, None
    return loss / rows, (hits / rows if plan.classify else None)


def _all_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _t(value, device) -> torch.Tensor:
    return torch.tensor(float(value), device=device)


def _state(model, optimizer, scheduler, progress: Progress, config: Config, plan: Plan) -> dict:
    model_payload = ckpt.model_payload(
        model, config.to_dict(), plan.in_features, plan.out_features, plan.classify
    )
    train = {
        "format": "raymb",
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "progress": asdict(progress),
    }
    return {"model": model_payload, "train": train}


def _restore(directory: Path, model, optimizer, scheduler, progress: Progress) -> None:
    payload = ckpt.read(directory / ckpt.MODEL_FILE)
    model.load_state_dict(payload["state_dict"])
    state = ckpt.read(directory / ckpt.STATE_FILE)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for key, value in state["progress"].items():
        setattr(progress, key, value)
