"""The advice features' costs (issue 25): train.noise_scale on the mlp and the gpt, and
`raymb lr-find` against a normal run of the same number of steps.

- noise_scale: raymb's train_step with the probe on against off, same weights, same batches,
  alternating blocks, one CPU thread per process: on 1 worker with k = 4 microbatches (the
  probe measures each microbatch's own gradient: a copy and a norm per microbatch) and on 2
  gloo workers with k = 1 (the DDP comm hook's norm of each bucket, and the step's norm).
  The metrics gather that carries the numbers is not timed: it runs about once a second
  either way, five more float64 per step in its one message.
- lr-find: raymb.driver.lr_find.lr_find(backend="gloo") (no Ray, 2 gloo workers) for S steps against
  raymb.driver.local.train_torch for the same S steps of the same config, launch to return.
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import alternate, dataset, median, target

TARGET = 0.03


def run(quick: bool) -> dict:
    steps, blocks = (2, 2) if quick else (5, 30)
    names = ("mlp", "gpt")
    two = _two_workers(names, steps, blocks)  # one gloo group times both models
    rows = []
    for name in names:
        rows.append({"what": f"noise_scale, {name}, W=1 k=4", **_one_worker(name, steps, blocks)})
        rows.append({"what": f"noise_scale, {name}, W=2 k=1", **two[name]})
    rows.append(_lr_find_row(20 if quick else 100))
    targets = [
        target(
            f"{r['what']}: step time on / off - 1",
            r["cost"],
            f"<= {TARGET:.0%}",
            r["cost"] <= TARGET,
        )
        for r in rows
        if r["what"].startswith("noise_scale")
    ]
    return {
        "description": "train.noise_scale's cost: median step time of train_step with the "
        "probe on / off - 1, alternating blocks (blocks x steps each); lr-find's wall time "
        "against train for the same steps, both on 2 gloo processes without Ray.",
        "params": {"steps_per_block": steps, "blocks": blocks},
        "columns": [
            ("what", "what"),
            ("off_ms", "off / train (ms)"),
            ("on_ms", "on / lr-find (ms)"),
            ("cost", "cost (on / off - 1)"),
            ("cost_min", "min block cost"),
            ("cost_max", "max block cost"),
        ],
        "rows": rows,
        "targets": targets,
        "notes": [
            "mlp: hidden [256, 256] on 64 features, batch 256, SGD; gpt: depth 4, width 128, "
            "T 64, vocab 256, batch 16, AdamW. One torch thread per process.",
            "off_ms/on_ms of the lr-find row are launch-to-return times in ms (process start, "
            "data read, the steps): lr-find checkpoints, validates and gathers nothing.",
        ],
    }


def _model(name: str, seed: int = 0):
    """(model, batches, rows a batch counts) of the mlp or the gpt, as bench/models.py's."""
    from raymb.config import ModelSection
    from raymb.models import build_model

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        model = build_model(ModelSection(name="mlp", hidden=[256, 256]), 64, 10)
        x = torch.randn(8 * 256, 64, generator=g)
        y = torch.randint(0, 10, (8 * 256,), generator=g)
        return model, list(zip(x.split(256), y.split(256))), 1
    section = ModelSection(name="gpt", depth=4, width=128, heads=4)
    model = build_model(section, (64,), 256)
    tokens = torch.randint(0, 256, (8 * 16, 65), generator=g)
    return model, [(b[:, :-1], b[:, 1:]) for b in tokens.split(16)], 64


def _steps(model, batches, per_row: int, sync, k: int, probe=None):
    from raymb.core.step import train_step

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    net = sync.wrap(model)

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        m = len(y) // k
        micro = [(x[j : j + m], y[j : j + m]) for j in range(0, len(y), m)]
        train_step(
            net,
            optimizer,
            micro,
            len(y) * per_row,
            sync=sync,
            classify=True,
            check_finite=False,
            observer=probe,
        )
        if probe is not None:
            probe.pop()

    return step


def _on(model, batches, per_row: int, world: int, k: int):
    """_steps with train.noise_scale's probe, as the worker attaches it."""
    from raymb.core.noise_probe import NoiseProbe
    from raymb.core.sync import GradSync

    probe = NoiseProbe(world)
    sync = GradSync(world, before_all_reduce=probe.add_local)
    return _steps(model, batches, per_row, sync, k, probe)


def _time(loops: dict, steps: int, blocks: int) -> dict:
    for fn in loops.values():
        for i in range(steps):
            fn(i)
    times: dict[str, list[float]] = {k: [] for k in loops}
    medians: dict[str, list[float]] = {k: [] for k in loops}
    for rep, which in alternate(tuple(loops), blocks):
        block = []
        for i in range((rep + 1) * steps, (rep + 2) * steps):
            started = time.perf_counter()
            loops[which](i)
            block.append(time.perf_counter() - started)
        times[which] += block
        medians[which].append(median(block))
    costs = [on / off - 1 for on, off in zip(medians["on"], medians["off"])]
    return {
        "off_ms": median(times["off"]) * 1e3,
        "on_ms": median(times["on"]) * 1e3,
        "cost": median(times["on"]) / median(times["off"]) - 1,
        "cost_min": min(costs),
        "cost_max": max(costs),
    }


def _one_worker(name: str, steps: int, blocks: int) -> dict:
    from raymb.core.sync import GradSync

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, batches, per_row = _model(name)
        loops = {
            "off": _steps(copy.deepcopy(model), batches, per_row, GradSync(1), 4),
            "on": _on(copy.deepcopy(model), batches, per_row, 1, 4),
        }
        return _time(loops, steps, blocks)
    finally:
        torch.set_num_threads(threads)


def _two_workers(names: tuple[str, ...], steps: int, blocks: int) -> dict[str, dict]:
    """_time of each model's loops on 2 gloo workers (rank 0's), one group for all of them."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        left = manager.Barrier(2)
        mp.spawn(_worker, args=(port, names, steps, blocks, out, left), nprocs=2, join=True)
        return dict(out)


def _worker(rank: int, port: int, names, steps: int, blocks: int, out, left) -> None:
    import torch.distributed as dist

    from raymb.core.sync import GradSync

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for name in names:
            model, batches, per_row = _model(name)
            mine = [(x[rank::2], y[rank::2]) for x, y in batches]  # this worker's half
            loops = {
                "off": _steps(copy.deepcopy(model), mine, per_row, GradSync(2), 1),
                "on": _on(copy.deepcopy(model), mine, per_row, 2, 1),
            }
            result = _time(loops, steps, blocks)
            if rank == 0:
                out[name] = result
        dist.barrier()  # no rank tears down while the other is still in a collective
    finally:
        dist.destroy_process_group()
    # Rank 0 serves the group's store: exiting while the peer is still inside
    # destroy_process_group closes sockets under its gloo threads, which abort it (SIGABRT,
    # "terminate called without an active exception"). No rank exits before both are past it
    # (as raymb/driver/launch.py's _torch_process waits, since 48456a9).
    left.wait(timeout=60)


def _lr_find_row(steps: int) -> dict:
    from raymb import load_config
    from raymb.driver.local import train_torch
    from raymb.driver.lr_find import lr_find

    with tempfile.TemporaryDirectory() as tmp:
        data = dataset(Path(tmp), 4096, val_fraction=0)
        sets = [
            f"data.train={data / 'train'}",
            f"run.storage_path={tmp}/runs",
            "model.name=mlp",
            "scale.workers=2",
            "train.global_batch_size=64",
            "checkpoint.metric=train_loss",
        ]
        started = time.perf_counter()
        train_torch(load_config(None, [*sets, "run.name=train", f"train.max_steps={steps}"]))
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        lr_find(
            load_config(None, [*sets, "run.name=find"]),
            low=1e-6,
            high=1e-2,
            steps=steps,
            backend="gloo",
        )
        find_s = time.perf_counter() - started
    return {
        "what": f"lr-find vs train, {steps} steps, W=2 (launch to return)",
        "off_ms": train_s * 1e3,
        "on_ms": find_s * 1e3,
        "cost": find_s / train_s - 1,
        "cost_min": None,
        "cost_max": None,
    }
