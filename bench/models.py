"""The new model families: tokens/s of the gpt and images/s of the cnn, raymb's step against
a hand-written torch loop on the same batches, the same weights, one CPU thread.

As bench/loop.py does for linear and mlp: one worker, k = 1, the batches already in memory,
so what is timed is what raymb adds around forward, backward and the optimizer step (for
the gpt, the loss summed over every token and weighted by 1 / tokens). Blocks of steps
alternate between the two loops; both must end with the same parameters.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable

import torch
from torch import nn

from bench.harness import alternate, median, peak_rss_mb, reset_peak_rss, target

TARGET = 1.05


def _sizes(quick: bool) -> dict:
    """Model and batch sizes; steps per block and blocks per loop (short blocks for the
    cnn's long steps, so the two loops alternate often on a busy machine)."""
    if quick:
        return {
            "gpt": dict(depth=1, width=32, heads=2, T=16, vocab=64, batch=4, steps=2, blocks=2),
            "cnn": dict(widths=[8, 16], image=[3, 16, 16], classes=10, batch=8, steps=2, blocks=2),
        }
    return {
        "gpt": dict(depth=4, width=128, heads=4, T=64, vocab=256, batch=16, steps=5, blocks=40),
        "cnn": dict(
            widths=[32, 64, 128], image=[3, 32, 32], classes=10, batch=64, steps=2, blocks=40
        ),
    }


def run(quick: bool) -> dict:
    sizes = _sizes(quick)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray Train worker with one CPU (OMP_NUM_THREADS=1)
    try:
        rows = [_gpt_row(sizes["gpt"]), _cnn_row(sizes["cnn"])]
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
    ]
    return {
        "description": "Median step time of raymb.step.train_step (GradSync for 1 worker, k=1, "
        "classify, the gpt's rows counted in tokens) and of a hand-written torch loop "
        "(zero_grad, mean cross-entropy, backward, step) on the same in-memory batches and "
        "weights, in alternating blocks of steps (blocks x steps per loop in the table); "
        "ratio = raymb's median step time / torch's; min/max: of the blocks' ratios (median "
        "step in a block).",
        "params": sizes,
        "columns": [
            ("model", "model"),
            ("batch", "batch"),
            ("unit", "unit"),
            ("blocks", "blocks x steps"),
            ("torch_step_ms", "torch step (ms)"),
            ("raymb_step_ms", "raymb step (ms)"),
            ("torch_rate", "torch (units/s)"),
            ("raymb_rate", "raymb (units/s)"),
            ("ratio", "ratio raymb/torch (median)"),
            ("ratio_min", "min ratio"),
            ("ratio_max", "max ratio"),
            ("cpu_ratio", "ratio of CPU time (median)"),
            ("max_param_diff", "max |Δθ| at the end"),
            ("peak_rss_mb", "peak RSS (MiB)"),
        ],
        "rows": rows,
        "targets": targets,
        "notes": [
            "gpt: AdamW (lr 3e-4), random token blocks, units are tokens (batch x T); cnn: "
            "model.norm = batch (the default), SGD (lr 0.05, momentum 0.9), random "
            "images, units are images.",
            "raymb's step runs as the loop runs it under train.on_nan = abort (the default): "
            "no gradient norm per step.",
            "Both loops run in this one process (no Ray) on one thread, as in a Ray Train "
            "worker given one CPU; peak RSS is the process's for the model's phase.",
            "Ratio of CPU time: the same ratio of medians over this thread's CPU time per step "
            "(time.thread_time): preemption by other processes does not inflate it (a busy "
            "sibling hyperthread or cache still does); wall time is what the target reads.",
        ],
    }


def _gpt_row(size: dict) -> dict:
    from raymb.config import ModelSection
    from raymb.models import build_model

    torch.manual_seed(0)
    section = ModelSection(
        name="gpt", depth=size["depth"], width=size["width"], heads=size["heads"]
    )
    model = build_model(section, (size["T"],), size["vocab"])
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, size["vocab"], (8 * size["batch"], size["T"] + 1), generator=g)
    batches = [(b[:, :-1], b[:, 1:]) for b in tokens.split(size["batch"])]
    row = {
        "model": f"gpt depth {size['depth']} width {size['width']} T {size['T']} "
        f"vocab {size['vocab']}",
        "batch": size["batch"],
        "blocks": f"{size['blocks']} x {size['steps']}",
        "unit": "tokens",
    }
    optimizer = functools.partial(torch.optim.AdamW, lr=3e-4)
    timing = _compare(model, batches, size["steps"], size["blocks"], optimizer, per_row=size["T"])
    return {**row, **_rates(timing, size["batch"] * size["T"])}


def _cnn_row(size: dict) -> dict:
    from raymb.config import ModelSection
    from raymb.models import build_model

    torch.manual_seed(0)
    model = build_model(
        ModelSection(name="cnn", widths=size["widths"]), tuple(size["image"]), size["classes"]
    )
    g = torch.Generator().manual_seed(1)
    n = 8 * size["batch"]
    images = torch.randn(n, *size["image"], generator=g)
    labels = torch.randint(0, size["classes"], (n,), generator=g)
    batches = list(zip(images.split(size["batch"]), labels.split(size["batch"])))
    row = {
        "model": f"cnn widths {size['widths']} on {'x'.join(map(str, size['image']))}",
        "batch": size["batch"],
        "blocks": f"{size['blocks']} x {size['steps']}",
        "unit": "images",
    }
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    timing = _compare(model, batches, size["steps"], size["blocks"], optimizer, per_row=1)
    return {**row, **_rates(timing, size["batch"])}


def _rates(timing: dict, units: int) -> dict:
    return {
        **timing,
        "torch_rate": units / timing["torch_step_ms"] * 1e3,
        "raymb_rate": units / timing["raymb_step_ms"] * 1e3,
    }


def _compare(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    blocks: int,
    optimizer: Callable,
    per_row: int,
) -> dict:
    """Per-step times of the two loops in alternating blocks; their parameters at the end."""
    from raymb.core.step import train_step
    from raymb.core.sync import build_sync

    reset_peak_rss()
    theirs, ours = copy.deepcopy(model), copy.deepcopy(model)
    opt_t, opt_o = optimizer(theirs.parameters()), optimizer(ours.parameters())
    sync = build_sync("grad", 1)
    net = sync.wrap(ours)

    def torch_step(i: int) -> None:
        xb, yb = batches[i % len(batches)]
        opt_t.zero_grad(set_to_none=True)
        out = theirs(xb)
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), yb.reshape(-1))
        loss.backward()
        opt_t.step()

    def raymb_step(i: int) -> None:
        xb, yb = batches[i % len(batches)]
        rows = len(yb) * per_row  # the gpt's loss is the mean over tokens
        train_step(net, opt_o, [(xb, yb)], rows, sync=sync, classify=True, check_finite=False)

    loops = {"torch": torch_step, "raymb": raymb_step}
    for fn in loops.values():  # warm-up: allocator, kernels, optimizer state
        for i in range(steps):
            fn(i)
    times: dict[str, list[float]] = {"torch": [], "raymb": []}
    cpu: dict[str, list[float]] = {"torch": [], "raymb": []}
    block_medians: dict[str, list[float]] = {"torch": [], "raymb": []}
    for rep, which in alternate(("torch", "raymb"), blocks):
        fn, block = loops[which], []
        for i in range((rep + 1) * steps, (rep + 2) * steps):
            started, started_cpu = time.perf_counter(), time.thread_time()
            fn(i)
            block.append(time.perf_counter() - started)
            cpu[which].append(time.thread_time() - started_cpu)
        times[which] += block
        block_medians[which].append(median(block))
    ratios = [o / t for o, t in zip(block_medians["raymb"], block_medians["torch"])]
    diff = max((a - b).abs().max().item() for a, b in zip(theirs.parameters(), ours.parameters()))
    return {
        "torch_step_ms": median(times["torch"]) * 1e3,
        "raymb_step_ms": median(times["raymb"]) * 1e3,
        "ratio": median(times["raymb"]) / median(times["torch"]),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        # With one torch thread the step runs on this thread (autograd included): its CPU
        # time does not count the time other processes hold the core.
        "cpu_ratio": median(cpu["raymb"]) / median(cpu["torch"]),
        "max_param_diff": diff,
        "peak_rss_mb": peak_rss_mb(),
    }
