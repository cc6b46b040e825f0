"""The row-keyed generator (raymb.core.rng): what its draws cost, and what dropout and
data.augment cost a training step, on one CPU thread (and the GPU's draws where there is one).

Draws: milliseconds per million uniforms, dropout keep-masks and normals. Steps: the gpt and
the cnn of bench/models.py through train_step under row keys, dropout 0.1 against 0 (the
gpt's attention then runs unfused, as its row-keyed mask needs); the cnn's collate with
data.augment (hflip 0.5, crop_padding 4 reflect, rotate_degrees 10) less without, as a share
of collate + step. Variants alternate; medians of per-repetition times.
"""

from __future__ import annotations

import time

import torch

from bench.harness import alternate, median, target

TARGET_AUGMENT = 0.15  # issue 26: augmentation at most 15% of the cnn's throughput


def run(quick: bool) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray Train worker with one CPU
    try:
        rows = _draws(torch.device("cpu"), quick)
        if torch.cuda.is_available():
            rows += _draws(torch.device("cuda"), quick)
        rows += _dropout_steps(quick)
        rows.append(_augment(quick))
    finally:
        torch.set_num_threads(threads)
    augment = rows[-1]
    return {
        "description": "Cost of raymb.core.rng's row-keyed draws per million, and of dropout "
        "and data.augment against none in the gpt's and cnn's steps (one CPU thread).",
        "params": {"quick": quick},
        "columns": [
            ("what", "what"),
            ("device", "device"),
            ("ms_per_million", "ms per million draws"),
            ("without_ms", "without (ms)"),
            ("with_ms", "with (ms)"),
            ("cost", "cost (with / without − 1)"),
        ],
        "rows": rows,
        "targets": [
            target(
                "cnn: augmentation's share of collate + step",
                augment["cost"],
                f"<= {TARGET_AUGMENT}",
                augment["cost"] <= TARGET_AUGMENT,
            )
        ],
        "notes": [
            "A draw is 12 int64 tensor ops (SplitMix64's finaliser after a Weyl step), the "
            "same bits on CPU and CUDA; a dropout mask compares the words themselves.",
            "The gpt's dropout cost includes its attention computed explicitly (the fused "
            "kernel draws its own mask).",
        ],
    }


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return median(times)


def _draws(device: torch.device, quick: bool) -> list[dict]:
    from raymb.core import rng

    n_rows, per_row = (64, 1024) if quick else (1024, 1024)
    ids = torch.arange(n_rows, device=device)
    keys = rng.RowKeys(0, 0, ids)
    kinds = {
        "uniform": lambda: rng.uniform(0, 1, 0, ids, (per_row,)),
        "dropout mask": lambda: rng.keep_mask(keys, 1, (per_row,), 0.1, device),
        "normal": lambda: rng.normal(0, 1, 0, ids, (per_row,)),
    }
    millions = n_rows * per_row / 1e6
    reps = 3 if quick else 20
    return [
        {"what": what, "device": device.type, "ms_per_million": _time(fn, reps) * 1e3 / millions}
        for what, fn in kinds.items()
    ]


def _dropout_steps(quick: bool) -> list[dict]:
    from raymb.config import ModelSection
    from raymb.core import rng
    from raymb.core.step import train_step
    from raymb.core.sync import build_sync
    from raymb.models import build_model

    if quick:
        gpt = dict(depth=1, width=32, heads=2, T=16, vocab=64, batch=4)
        cnn = dict(widths=[8, 16], image=(3, 16, 16), batch=8)
    else:
        gpt = dict(depth=4, width=128, heads=4, T=64, vocab=256, batch=16)
        cnn = dict(widths=[32, 64, 128], image=(3, 32, 32), batch=64)
    cases = {
        "gpt step, dropout 0.1": (
            lambda p: ModelSection(
                name="gpt", depth=gpt["depth"], width=gpt["width"], heads=gpt["heads"], dropout=p
            ),
            (gpt["T"],),
            gpt["vocab"],
            torch.randint(0, gpt["vocab"], (gpt["batch"], gpt["T"] + 1)),
        ),
        "cnn step, dropout 0.1": (
            lambda p: ModelSection(name="cnn", widths=cnn["widths"], norm="group", dropout=p),
            cnn["image"],
            10,
            torch.randn(cnn["batch"], *cnn["image"]),
        ),
    }
    rows = []
    reps = 2 if quick else 10
    for what, (section, shape, out, data) in cases.items():
        if what.startswith("gpt"):
            x, y = data[:, :-1], data[:, 1:]
        else:
            x, y = data, torch.randint(0, out, (len(data),))
        steps = {}
        for p in (0.0, 0.1):
            torch.manual_seed(0)
            model = build_model(section(p), shape, out)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            sync = build_sync("grad", 1)
            net = sync.wrap(model)
            keys = rng.RowKeys(0, 0, torch.arange(len(x)))

            def step(net=net, opt=opt, sync=sync, keys=keys, x=x, y=y) -> None:
                with rng.row_keys(keys):
                    train_step(net, opt, [(x, y)], y.numel(), sync=sync, classify=True)

            steps[p] = step
        times: dict[float, list[float]] = {0.0: [], 0.1: []}
        for _, p in alternate((0.0, 0.1), reps):
            times[p].append(_time(steps[p], 1))
        without, with_ = median(times[0.0]), median(times[0.1])
        rows.append(_row(what, without, with_))
    return rows


def _augment(quick: bool) -> dict:
    from raymb.config import ModelSection
    from raymb.config.data import AugmentSection
    from raymb.core import rng
    from raymb.core.shape import InputShape
    from raymb.core.step import train_step
    from raymb.core.sync import build_sync
    from raymb.data.augment import Augment
    from raymb.models import build_model

    widths, image, batch = ([8, 16], (3, 16, 16), 8) if quick else ([32, 64, 128], (3, 32, 32), 64)
    stored = torch.randint(0, 256, (batch, *image), dtype=torch.uint8)
    y = torch.randint(0, 10, (batch,))
    inputs = InputShape("classify", image, scale=1 / 255, mean=(0.5,) * 3, std=(0.25,) * 3)
    augment = Augment.of(AugmentSection(hflip=0.5, crop_padding=4, rotate_degrees=10.0))
    keys = rng.RowKeys(0, 0, torch.arange(batch))
    torch.manual_seed(0)
    model = build_model(ModelSection(name="cnn", widths=widths, norm="group"), image, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sync = build_sync("grad", 1)
    net = sync.wrap(model)

    def collate(with_augment: bool) -> None:
        inputs.collate(stored, y, augment if with_augment else None, keys)

    def step() -> None:
        x, _ = inputs.collate(stored, y)
        train_step(net, opt, [(x, y)], batch, sync=sync, classify=True)

    # The transforms' own time (collate with them less without, many short repetitions) as a
    # share of a step's collate + step: a difference of two noisy step times would drown
    # a few milliseconds in a busy machine's noise.
    times: dict[bool, list[float]] = {False: [], True: []}
    for _, variant in alternate((False, True), 10 if quick else 100):
        times[variant].append(_time(lambda v=variant: collate(v), 1))
    extra = median(times[True]) - median(times[False])
    step_s = _time(step, 2 if quick else 10)
    return _row("cnn collate + step, augmented", step_s, step_s + extra)


def _row(what: str, without: float, with_: float) -> dict:
    return {
        "what": what,
        "device": "cpu",
        "without_ms": without * 1e3,
        "with_ms": with_ * 1e3,
        "cost": with_ / without - 1,
    }
