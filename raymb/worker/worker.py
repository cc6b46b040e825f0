"""What every worker of raymb holds, whichever loop drives it (epochs, --follow, lr-find).

`Worker` builds the model, optimizer, scheduler and sync strategy, resumes them from the run's
latest checkpoint, takes steps, keeps their metrics (raymb.worker.metrics), validates, and
puts together a report's metrics. The loops (raymb.worker.epochs for epochs,
raymb.worker.follow for arriving files) decide which rows each step trains on, and ask the
checkpointer (raymb.worker.checkpointer) when to validate and checkpoint and the stop objects
(raymb.worker.stopping) when to stop. What it needs of the runtime (rank, device, the latest
checkpoint, reports) it asks of its session (raymb.worker.session): Ray Train, or a plain
torch.distributed group.
"""

from __future__ import annotations

import contextlib
import random
import time
from typing import Any

import torch
import torch.distributed as dist

from raymb.config import Config
from raymb.core import batch
from raymb.core.ema import EMA
from raymb.core.loss import lm_metrics
from raymb.core.noise import NoiseScale
from raymb.core.noise_probe import Measured, NoiseProbe
from raymb.core.objective import Objective
from raymb.core.optim import build_optimizer, build_scheduler
from raymb.core.step import train_step
from raymb.core.sync import build_sync
from raymb.models import build_model
from raymb.models.init_from import apply_init
from raymb.storage import Location
from raymb.worker.checkpointer import Checkpointer, Progress, restore
from raymb.worker.feed import Batch
from raymb.worker.metrics import Entry, Ledger
from raymb.worker.session import Session
from raymb.worker.spec import Code, Shape
from raymb.worker.stopping import STOP_FILE, STOP_LOOK_S, StopRequest

__all__ = ["POLL_ENV", "POLL_S", "STOP_FILE", "STOP_LOOK_S", "Progress", "Worker", "all_sum"]

POLL_ENV, POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 0.2
"""How often Ray Train's controller polls the workers: a report waits for the next poll (every
2 s by default, the whole cost of a checkpoint of a small model). The driver sets it."""


class Worker:
    """One worker's model, optimizer, scheduler and sync strategy, its steps and metrics."""

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
        stop_file: Location | None = None,
        code: Code | None = None,
    ) -> None:
        """`epoch_steps`: an epoch's steps, when fewer than train.log_every the window of the
        reports' train_loss (raymb.worker.metrics); `stop_file`: where rank 0 looks for the
        driver's stop request at each gather (raymb.worker.stopping.StopRequest); `code`: the
        model, loss and metrics given from Python (raymb.train), and the metrics' names."""
        code = code or Code()
        self.given = tuple(k for k in ("model", "loss", "metrics") if getattr(code, k) is not None)
        """What came from Python (raymb.train(model=, ...)): checkpoints say so, for the tools."""
        self.config, self.shape, self.mode, self.val = config, shape, mode, val
        self.session = session
        self.rank, self.world = session.rank, session.world
        self.device = device = session.device
        self.nodes = _count_nodes(session)
        if config.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(config.train.seed)
        self.model = build_run_model(config, shape, code.load("model"))
        # model.init_from, read by rank 0 alone (the wrap's broadcast gives the others its
        # values); model.freeze on every rank.
        apply_init(self.model, config.model, load=self.rank == 0)
        self.model.to(device)
        self.objective = Objective.of(
            config,
            shape.classify,
            loss=code.load("loss"),
            metrics=code.load("metrics"),
            metric_names=code.metric_names,
        )
        trained = [p for p in self.model.parameters() if p.requires_grad]  # not model.freeze's
        self.optimizer = build_optimizer(config.optim, trained)
        self.scheduler = build_scheduler(config.optim, self.optimizer, total_steps)
        self.probe = NoiseProbe(self.world) if config.train.noise_scale else None
        """train.noise_scale: watches each step's gradients (raymb.core.noise_probe)."""
        watch = self.probe.add_local if self.probe is not None else None
        self.sync = build_sync(config, self.world, device, before_all_reduce=watch)
        self.progress = Progress()
        train = config.train
        self.ema = EMA(train.ema_decay, train.ema_warmup_steps) if train.ema_decay else None
        """train.ema_decay: the average of the weights that validation and model.pt use."""
        # Randomness after init (dropout, ...) differs between workers; a checkpoint carries
        # each worker's generator state, so a resumed run draws what an uninterrupted one would.
        torch.manual_seed(config.train.seed * 1000 + self.rank)
        random.seed(config.train.seed * 1000 + self.rank)
        saved_sync = None
        with session.restored() as directory:
            if directory is not None:
                saved_sync = restore(self, directory, mode)
                self.progress.resumed_from_steps.append(self.progress.step)
        self.net = self.sync.wrap(self.model)
        if self.ema is not None and not self.ema.shadow:  # after the wrap: rank 0's weights
            self.ema.start(self.model)
            if self.rank == 0 and mode != "lr-find":
                print(
                    f"raymb: validation and model.pt use the EMA of the weights "
                    f"(train.ema_decay={train.ema_decay})",
                    flush=True,
                )
        if saved_sync is not None:
            self.sync.load_state_dict(saved_sync)
        self.sync.comm.bytes = self.progress.bytes_allreduced
        extra = tuple(f"val_{name}" for name in code.metric_names)
        self.ledger = _ledger(config, self.progress, run_dir, session, epoch_steps, extra)
        # Skipping a step needs every worker's verdict each step; aborting is decided from the
        # losses when they are gathered (StopRequest.heard), before any checkpoint.
        self.check_each_step = config.train.on_nan == "skip"
        self.checkpointer = Checkpointer(config, session, mode=mode)
        self.stop = StopRequest(stop_file, self.rank)
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
            objective=self.objective,
            grad_clip=self.config.optim.grad_clip,
            bf16=self.config.train.precision == "bf16",
            check_finite=self.check_each_step,
            uneven=uneven,
            l1=self.config.optim.l1,
            observer=self.probe,
        )
        if taken and self.ema is not None:
            self.ema.update(self.model)
        self.scheduler.step()
        self.measured = _take_noise(self.probe, self.shape.inputs.units_per_row)
        self.progress.skipped_steps += not taken
        self.progress.step += 1
        return loss, taken, time.perf_counter() - started

    def consolidate(self) -> None:
        """One model to validate and save: under param and diloco, the mean of the workers'."""
        self.sync.consolidate(self.net, self.optimizer)

    def record(self, loss, taken: bool, rows: int, *, step_s: float, wait_s: float, logged: bool):
        """Keep the step's metrics (`rows`: the step's rows on all workers); `logged`: the step
        has a row in metrics.csv (besides the train.log_every grid: a checkpoint's)."""
        progress = self.progress
        progress.samples += rows
        progress.train_seconds += step_s + wait_s
        counted = self.objective.step_count if self.objective.counted else None
        self.ledger.add(
            Entry(
                row=self._row(),
                loss=loss if taken else None,
                rows=rows,
                units=rows * self.shape.inputs.units_per_row,
                count=counted,
                step_s=step_s,
                wait_s=wait_s,
                ended=time.perf_counter(),
                logged=logged or progress.step % self.config.train.log_every == 0,
                noise=self.measured if taken else None,
            )
        )
        self.measured = None

    def gather(self) -> None:
        """The entries' rows into metrics.csv (a collective); the stop request and a
        non-finite loss ride along (StopRequest.heard raises on the latter)."""
        self.stop.heard(*self.ledger.gather(self.stop.look()))

    def report_metrics(self) -> dict[str, Any]:
        """After a gather, what a report (Checkpointer.report) holds; metrics.csv's rows up to
        here are in storage, and the losses a checkpoint carries in progress."""
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
        if self.ledger.csv is not None:
            self.ledger.csv.flush()  # the rows up to this checkpoint, in storage before it
        progress.recent_losses = self.ledger.recent_state()
        return metrics

    @torch.no_grad()
    def validate(self) -> None:
        """data.val's loss (sum / count over every row), accuracy for classifiers (per token for
        lm) and metrics.name's metrics, all workers, into progress: "best by val_loss" needs a
        val_loss at every checkpoint."""
        if self.val is None:
            return
        model, device, objective = self.model, self.device, self.objective
        model.eval()
        sums = None
        with self.averaged():
            for x, y in self.val:
                x, y = self.shape.inputs.collate(batch.to(x, device), batch.to(y, device))
                part = objective.sums(model, x, y)
                sums = part if sums is None else sums + part
        model.train()
        if sums is None:  # no validation row on this worker: zeros of the same length
            sums = torch.zeros(
                4 + 2 * len(objective.metric_names), dtype=torch.float64, device=device
            )
        loss, count, hits, predicted, *metrics = all_sum(sums).tolist()
        progress = self.progress
        progress.val_loss = loss / count if count else None
        progress.val_accuracy = hits / predicted if predicted else None
        progress.val_metrics = {
            f"val_{name}": (total / n if n else None)
            for name, total, n in zip(objective.metric_names, metrics[0::2], metrics[1::2])
        }

    def averaged(self):
        """The model holding the EMA of its weights for the block, when train.ema_decay is set
        (validation, a checkpoint's model.pt)."""
        return self.ema.swapped(self.model) if self.ema is not None else contextlib.nullcontext()

    def _row(self) -> dict:
        """The counters of a metrics row, as they stand after a step."""
        p = self.progress
        return {
            "step": p.step,
            "epoch": p.epoch,
            "val_loss": p.val_loss,
            "val_accuracy": p.val_accuracy,
            **p.val_metrics,
            **lm_metrics(p.val_loss, self.shape.inputs.task, self.shape.tokenizer),
            "lr": self.scheduler.get_last_lr()[0],
            "samples": p.samples,
            "bytes_allreduced": self.sync.comm.bytes,
            "skipped_steps": p.skipped_steps,
            "workers": self.world,
        }


def build_run_model(config: Config, shape: Shape, given: Any) -> torch.nn.Module:
    """The model: config.model's, or the one raymb.train(model=...) was given: a module (a
    copy of it: every worker starts from its values) or a factory called as model.name's is."""
    model_shape = shape.inputs.model_shape
    if given is None:
        return build_model(config.model, model_shape, shape.out_features)
    if isinstance(given, torch.nn.Module):
        return given
    model = given(model_shape, shape.out_features)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model= returned {type(model).__name__}, not a torch.nn.Module")
    return model


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _ledger(
    config: Config,
    progress: Progress,
    run_dir: Location,
    session: Session,
    epoch_steps: int | None,
    extra: tuple[str, ...] = (),
) -> Ledger:
    """metrics.csv's rows to come (rank 0 writes them), carrying on from a resumed run's."""
    csv_path = run_dir / "metrics.csv" if session.rank == 0 else None
    noise = NoiseScale.from_state(progress.noise) if config.train.noise_scale else None
    ledger = Ledger(
        csv_path,
        session.world,
        session.device,
        log_every=config.train.log_every,
        window=epoch_steps,
        recent=progress.recent_losses,
        noise=noise,
        extra=extra,
    )
    if ledger.csv is not None:
        ledger.csv.truncate_after(progress.step)  # rows a resume writes again
    return ledger


def _take_noise(probe: NoiseProbe | None, units: int) -> Measured | None:
    """train.noise_scale: the step's norms (raymb.core.noise_probe.NoiseProbe.take), with 1/B
    in rows rather than tokens for lm: the estimate is a number of rows."""
    measured = probe.pop() if probe is not None else None
    if measured is None:
        return None
    squares, (parts, inverse, inverse_big) = measured
    return squares, (parts, inverse * units, inverse_big * units)


def _count_nodes(session: Session) -> int:
    """How many nodes the workers run on (by node id: nodes may share an address)."""
    if session.world == 1:
        return 1
    node = session.node_id()
    ids: list = [None] * session.world
    dist.all_gather_object(ids, node)
    return len(set(ids))
