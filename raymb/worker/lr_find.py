"""The learning-rate range test's worker loop (`raymb lr-find`): the epoch loop's data path,
steps and sync, with the rate set before each step from the schedule (raymb.core.lr_find).

Each step's summed loss is all-reduced, so every rank adds the same mean loss to the same
curve and stops at the same step; nothing is validated, checkpointed or reported. Rank 0
writes lr_find.csv (step, lr, loss, smoothed_loss) into the test's own directory at each
progress line and at the end, so an abandoned test keeps most of its curve. The driver's stop
request (its STOP file, on the first Ctrl-C or SIGTERM) rides on the same all-reduce: rank 0
looks for the file, and every rank stops at the same step.
"""

from __future__ import annotations

import csv
import io
import time

import torch

from raymb.core.lr_find import CSV_COLUMNS, CSV_FILE, Curve
from raymb.core.rng import row_keys
from raymb.worker.epochs import StepBatches
from raymb.worker.feed import train_source
from raymb.worker.session import RaySession, Session
from raymb.worker.spec import LrFindSpec, Shape
from raymb.worker.worker import STOP_FILE, STOP_LOOK_S, Worker, all_sum

__all__ = ["CSV_COLUMNS", "CSV_FILE", "curve_csv", "lr_find_loop", "read_curve"]


def lr_find_loop(payload: dict[str, LrFindSpec], session: Session | None = None) -> None:
    """Ray Train calls it with its train_loop_config ({"spec": LrFindSpec}); a TorchSession
    passes itself."""
    spec = payload["spec"]
    run = spec.run
    session = session or RaySession(run.run_dir)
    config, rank, world = run.config, session.rank, session.world
    plan = run.plan.for_world(world)
    inputs = plan.input_shape
    shape = Shape(inputs, plan.out_features, run.tokenizer)
    with Worker(
        config,
        shape,
        run.run_dir,
        mode="lr-find",
        total_steps=len(spec.lrs),
        session=session,
        code=run.code,
    ) as worker:  # its local files go when the loop ends (Worker.close)
        device = worker.device
        features, label = config.data.reads, config.data.label_column
        source = train_source(run.train, session.fetch, features, label, plan, rank, world)
        batches = StepBatches.of(config, plan, rank, device)
        curve = Curve()
        stop_file = run.run_dir / STOP_FILE
        looked = -float("inf")
        epoch, s = 0, 0
        steps = source.steps(epoch, s)
        for lr in spec.lrs:
            if s == plan.steps_per_epoch:
                epoch, s = epoch + 1, 0
                steps = source.steps(epoch, s)
            microbatches, keys = batches(next(steps), s, epoch)
            for group in worker.optimizer.param_groups:
                group["lr"] = lr  # after the scheduler's step, which set its own
            with row_keys(keys):
                loss, _, _ = worker.step(
                    microbatches, plan.rows_in_step(s, rank), uneven=not plan.even(s)
                )
            # Rank 0's look for the stop file rides on the loss's all-reduce (a sum: the other
            # ranks add 0), so every rank learns of it at the same step.
            asked = 0.0
            if rank == 0 and time.monotonic() - looked >= STOP_LOOK_S[stop_file.local]:
                looked = time.monotonic()
                asked = float(stop_file.exists())
            flag = torch.tensor([asked], dtype=torch.float64, device=device)
            # The step's count: its rows (tokens for lm), or a counted loss's, summed alike.
            objective = worker.objective
            count = plan.step_rows(s) * inputs.units_per_row / world
            if objective.counted:
                count = objective.step_count.double().reshape(()).to(device)
            count = torch.as_tensor(count, dtype=torch.float64, device=device).reshape(1)
            summed = all_sum(torch.cat([loss.detach().double().reshape(1).to(device), flag, count]))
            mean = summed[0].item() / summed[2].item()
            s += 1
            stop = curve.add(lr, mean)
            done = len(curve.lrs)
            stopping = summed[1].item() > 0
            if rank == 0 and (stop or done % max(1, len(spec.lrs) // 10) == 0):
                print(
                    f"raymb: lr-find: step {done}/{len(spec.lrs)}, lr {lr:.3g}, "
                    f"smoothed loss {curve.smoothed[-1]:.4g}",
                    flush=True,
                )
                if not stop:
                    (run.run_dir / CSV_FILE).write_text(curve_csv(curve))  # the curve so far
            if stop or stopping:
                break
        if rank == 0:
            (run.run_dir / CSV_FILE).write_text(curve_csv(curve))


def curve_csv(curve: Curve) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for i, (lr, loss, smooth) in enumerate(zip(curve.lrs, curve.losses, curve.smoothed)):
        writer.writerow([i + 1, repr(lr), repr(loss), repr(smooth)])
    return out.getvalue()


def read_curve(text: str) -> tuple[list[float], list[float]]:
    """(rates, losses) of an lr_find.csv."""
    rows = list(csv.DictReader(io.StringIO(text)))
    return [float(r["lr"]) for r in rows], [float(r["loss"]) for r in rows]
