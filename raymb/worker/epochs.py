"""The per-worker training loop: what each worker runs, top to bottom.

next step's rows (raymb.worker.feed) -> the collate (data.augment) -> train_step, under the
rows' keys (raymb.core.rng: what dropout and augmentation draw from) -> ask the checkpointer
whether a checkpoint is due (checkpoint.every_steps, an epoch's end at least
checkpoint.min_interval_s after the last, the end, a stop: raymb.worker.checkpointer) -> if
so, validate -> a metrics entry -> if so, report with the checkpoint (early stopping counts
it), else gather the metrics when due. Every rank checkpoints and gathers metrics at the same
steps: the session's report and the gathers are collectives. When the driver asks to stop
(Ctrl-C, SIGTERM: <run dir>/STOP), the workers learn it at a gather (raymb.worker.stopping)
and make the next step a checkpoint, then return. fault.* drills (raymb.worker.drills) wrap
the step batches, not the loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from raymb.config import Config
from raymb.core import batch
from raymb.core.order import rank_rows
from raymb.core.plan import Plan
from raymb.core.rng import RowKeys, row_keys
from raymb.core.shape import InputShape
from raymb.data.augment import Augment
from raymb.timeline import process_started, stamp
from raymb.worker.checkpointer import Progress
from raymb.worker.drills import with_drills
from raymb.worker.feed import Batch, train_source, val_batches
from raymb.worker.session import RaySession, Session
from raymb.worker.spec import EpochsSpec, Shape
from raymb.worker.stopping import STOP_FILE, EarlyStopper
from raymb.worker.worker import Worker


def train_loop(payload: dict[str, EpochsSpec], session: Session | None = None) -> None:
    """Ray Train calls it with its train_loop_config ({"spec": EpochsSpec}); a TorchSession
    passes itself."""
    spec = payload["spec"]
    session = session or RaySession(spec.run_dir)
    config, run_dir = spec.config, spec.run_dir
    rank, world = session.rank, session.world
    stamp("worker process", rank, t=process_started())
    stamp("loop", rank)  # Ray Train has set up the process group
    plan = spec.plan.for_world(world)  # elastic: as many workers as the cluster gave
    features = config.data.reads  # data.features, or the named columns
    label = config.data.label_column
    fetch = session.fetch
    val = val_batches(spec.val, fetch, features, label, rank, world, max(plan.microbatch, 1024))
    inputs = plan.input_shape
    shape = Shape(inputs, plan.out_features, spec.tokenizer)
    with Worker(
        config,
        shape,
        run_dir,
        mode="epochs",
        total_steps=plan.total_steps,
        session=session,
        val=val,
        epoch_steps=plan.steps_per_epoch,
        stop_file=run_dir / STOP_FILE,
        code=spec.code,
    ) as worker:  # its local files go when the loop ends (Worker.close)
        stamp("model", rank)  # and data.val, and the checkpoint a resumed run starts from
        progress, device = worker.progress, worker.device
        checkpointer, stop, early = worker.checkpointer, worker.stop, EarlyStopper.of(config)
        if worker.resumed and rank == 0:
            print(f"raymb: resumed from step {progress.step} (epoch {progress.epoch})", flush=True)
        if _finished(progress, plan):  # a finished run started again: report where it ended
            checkpointer.report(worker.report_metrics(), None)
            return
        source = train_source(spec.train, fetch, features, label, plan, rank, world)
        batches = StepBatches.of(config, plan, rank, device)
        batches = with_drills(batches, config.fault, run_dir, rank, progress)  # fault.*, if set
        stamp("data", rank)
        first_step = True

        while not _finished(progress, plan):
            steps = source.steps(progress.epoch, progress.step_in_epoch)
            while progress.step_in_epoch < plan.steps_per_epoch and not _finished(progress, plan):
                waited = time.perf_counter()
                s = progress.step_in_epoch
                microbatches, keys = batches(next(steps), s, progress.epoch)
                wait_s = time.perf_counter() - waited
                rows = plan.rows_in_step(s, rank)
                with row_keys(keys):  # dropout's masks: the step narrows them per microbatch
                    loss, taken, step_s = worker.step(microbatches, rows, uneven=not plan.even(s))
                if first_step:
                    stamp("first step", rank)
                    first_step = False
                progress.step_in_epoch += 1

                epoch_end = progress.step_in_epoch == plan.steps_per_epoch
                if epoch_end:
                    progress.epoch += 1
                    progress.step_in_epoch = 0
                stopping = stop.requested  # agreed by every worker at the last gather
                end = _finished(progress, plan)
                due = checkpointer.due(progress.step, end=end, stop=stopping, epoch_end=epoch_end)
                if due:
                    worker.consolidate()
                    worker.validate()
                worker.record(
                    loss, taken, plan.step_rows(s), step_s=step_s, wait_s=wait_s, logged=due
                )
                if due:
                    metrics = worker.report_metrics()
                    early.update(progress, metrics)  # may end the run: _finished
                    checkpointer.report(metrics, worker)
                elif worker.ledger.due:
                    worker.gather()
                if stopping:
                    return  # the checkpoint just taken holds everything; the driver says so
                if epoch_end:
                    break


@dataclass(frozen=True)
class StepBatches:
    """Turns a step's rows from the source into what train_step takes: on the device,
    collated (data.augment) under the rows' keys, cut into microbatches of plan.microbatch."""

    plan: Plan
    inputs: InputShape
    seed: int
    augment: Augment | None
    rank: int
    device: torch.device

    @classmethod
    def of(cls, config: Config, plan: Plan, rank: int, device: torch.device) -> StepBatches:
        inputs = plan.input_shape
        return cls(plan, inputs, config.train.seed, Augment.of(config.data.augment), rank, device)

    def __call__(self, rows: Batch, step_in_epoch: int, epoch: int) -> tuple[list[Batch], RowKeys]:
        """The microbatches, and the rows' keys (dropout draws from them)."""
        x, y = batch.to(rows[0], self.device), batch.to(rows[1], self.device)
        ids = row_ids(self.plan, step_in_epoch, self.rank, self.device)
        keys = RowKeys(self.seed, epoch, ids)
        x, y = self.inputs.collate(x, y, self.augment, keys)
        # A worker without a row in a short last step still takes part (an empty batch): the
        # gradient all-reduce needs every worker's backward.
        m, n = self.plan.microbatch, batch.rows(y)
        cut = [(batch.part(x, i, i + m), batch.part(y, i, i + m)) for i in range(0, n, m)]
        return cut or [(x, y)], keys


def row_ids(plan: Plan, step_in_epoch: int, rank: int, device) -> torch.Tensor:
    """The ids the row-keyed draws (dropout, data.augment) know worker `rank`'s rows of a step
    by: their places in the epoch's order, in the order the source yields them (both sources
    take the rank's slice of the step's part of the order: raymb.core.order). A row's id,
    and so its draws, never depend on W, k or a resume."""
    first, rows = step_in_epoch * plan.step_total, plan.step_rows(step_in_epoch)
    part = rank_rows(first, rows, plan.workers, rank)
    return torch.arange(part.start, part.stop, device=device)


def _finished(progress: Progress, plan: Plan) -> bool:
    return (
        progress.stopped_early
        or progress.epoch >= plan.epochs
        or (plan.max_steps is not None and progress.step >= plan.max_steps)
    )
