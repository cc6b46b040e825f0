"""Loop overhead: raymb's train_step against a hand-written torch loop, same math, same tensors.

One worker, k = 1, the data already in memory as tensors: what is timed is only what raymb
adds around forward, backward and the optimizer step (the sync strategy's hooks, the loss
weighting). Both loops start from the same weights, see the same
batches and must end with the same parameters. Blocks of steps alternate between the two.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from torch import nn

from bench.harness import alternate, dataset, median, peak_rss_mb, reset_peak_rss, target

TARGET = 1.05


def run(quick: bool) -> dict:
    from raymb.data.columns import table_to_tensors

    rows_n, batch = (4096, 256) if quick else (65536, 256)
    steps, reps = (10, 2) if quick else (100, 40)
    with tempfile.TemporaryDirectory() as tmp:
        data = dataset(Path(tmp), rows_n, val_fraction=0)
        x, y = table_to_tensors(pq.read_table(data / "train"), "features", "label")
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(y) - batch + 1, batch)]
    classes = int(y.max()) + 1

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray Train worker with one CPU (OMP_NUM_THREADS=1)
    try:
        rows = [
            _model_row(name, clip, x, classes, batches, steps, reps)
            for name, clip in (("linear", None), ("mlp", None), ("mlp", 1.0))
        ]
    finally:
        torch.set_num_threads(threads)
    targets = [
        target(
            f"{r['model']}: step time raymb / torch",
            r["ratio"],
            f"<= {TARGET}",
            r["ratio"] <= TARGET,
        )
        for r in rows
        if r["grad_clip"] is None
    ]
    return {
        "description": "Median step time of raymb.step.train_step (GradSync for 1 worker, k=1) "
        "and of a hand-written torch loop on the same in-memory batches, in "
        f"{reps} alternating blocks of {steps} steps each; ratio = raymb's median step time / "
        "torch's; min/max: of the blocks' ratios (median step in a block).",
        "params": {"rows": rows_n, "batch": batch, "steps_per_block": steps, "blocks": reps},
        "columns": [
            ("model", "model"),
            ("grad_clip", "grad_clip"),
            ("torch_step_us", "torch step (µs)"),
            ("raymb_step_us", "raymb step (µs)"),
            ("ratio", "ratio raymb/torch (median)"),
            ("ratio_min", "min ratio"),
            ("ratio_max", "max ratio"),
            ("max_param_diff", "max |Δθ| at the end"),
            ("peak_rss_mb", "peak RSS (MiB)"),
        ],
        "rows": rows,
        "targets": targets,
        "notes": [
            "Both loops run in this one process (no Ray): peak RSS is the process's for the "
            "model's phase (VmHWM, reset before each model).",
            "raymb's step runs as the loop runs it under train.on_nan = abort (the default): "
            "no gradient norm per step (the summed losses are checked when metrics are "
            "gathered, about once a second); with grad_clip both compute the norm "
            "(clip_grad_norm_).",
            "torch runs on one thread, as in a Ray Train worker given one CPU "
            "(Ray sets OMP_NUM_THREADS=1 there).",
        ],
    }


def _model_row(name, clip, x, classes, batches, steps, reps) -> dict:
    from raymb.config import ModelSection
    from raymb.models import build_model

    torch.manual_seed(0)
    section = ModelSection(name=name)
    model = build_model(section, x.shape[1], classes)
    row = {"model": name + ("" if name == "linear" else f" {section.hidden}"), "grad_clip": clip}
    return {**row, **_compare(model, batches, steps, reps, clip)}


def _compare(model: nn.Module, batches, steps: int, reps: int, clip: float | None) -> dict:
    from raymb.core.step import train_step
    from raymb.core.sync import build_sync

    reset_peak_rss()
    theirs, ours = copy.deepcopy(model), copy.deepcopy(model)
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    sync = build_sync("grad", 1)
    net = sync.wrap(ours)

    def torch_step(i: int) -> None:
        xb, yb = batches[i % len(batches)]
        opt_t.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(theirs(xb), yb)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(theirs.parameters(), clip)
        opt_t.step()

    def raymb_step(i: int) -> None:
        xb, yb = batches[i % len(batches)]
        # As raymb.worker.epochs calls it under train.on_nan = "abort" (the default): the losses are
        # checked when metrics are gathered, not by a gradient norm each step.
        train_step(
            net,
            opt_o,
            [(xb, yb)],
            len(yb),
            sync=sync,
            classify=True,
            grad_clip=clip,
            check_finite=False,
        )

    loops = {"torch": torch_step, "raymb": raymb_step}
    for fn in loops.values():  # warm-up: allocator, kernels, optimizer state
        for i in range(steps):
            fn(i)
    # Per-step times: their median shrugs off the preemptions of a busy machine, which a
    # block's total does not.
    times: dict[str, list[float]] = {"torch": [], "raymb": []}
    blocks: dict[str, list[float]] = {"torch": [], "raymb": []}
    for rep, which in alternate(("torch", "raymb"), reps):
        fn, block = loops[which], []
        for i in range((rep + 1) * steps, (rep + 2) * steps):
            started = time.perf_counter()
            fn(i)
            block.append(time.perf_counter() - started)
        times[which] += block
        blocks[which].append(median(block))
    ratios = [o / t for o, t in zip(blocks["raymb"], blocks["torch"])]
    diff = max((a - b).abs().max().item() for a, b in zip(theirs.parameters(), ours.parameters()))
    return {
        "torch_step_us": median(times["torch"]) * 1e6,
        "raymb_step_us": median(times["raymb"]) * 1e6,
        "ratio": median(times["raymb"]) / median(times["torch"]),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "max_param_diff": diff,
        "peak_rss_mb": peak_rss_mb(),
    }
