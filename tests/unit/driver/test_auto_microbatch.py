"""train.microbatch_size = "auto" on a CPU: the largest exact microbatch within the budget,
and never a change of the math. Plain Python and torch, no Ray."""

from __future__ import annotations

import torch

from raymb.core.optim import build_optimizer
from raymb.core.shape import InputShape
from raymb.core.step import train_step
from raymb.core.sync import GradSync
from raymb.driver.sizing import build_plan
from raymb.load import load_config
from raymb.models import build_model

FLAT4 = InputShape(task="regress", shape=(4,))


def _config(*overrides: str):
    base = ["model.name=mlp", "train.global_batch_size=64", "scale.workers=1"]
    return load_config(None, [*base, *overrides])


def test_auto_picks_the_largest_divisor_that_fits_by_hand():
    # mlp 4 -> 64 -> 64 -> 1 keeps, per sample: input 4, Linear 64, ReLU 64, Linear 64,
    # ReLU 64, Linear 1 = 261 floats, and as many gradients: 261 * 2 * 4 bytes = 2088.
    # 20 KiB = 20480 bytes holds 9 samples; the largest divisor of G/W = 64 up to 9 is 8.
    config = _config("train.microbatch_size=auto", "train.memory_budget=20KiB")
    plan = build_plan(config, num_rows=1024, inputs=FLAT4, out_features=1)
    assert plan.microbatch == 8 and plan.step_total == 64
    roomy = _config("train.microbatch_size=auto", "train.memory_budget=1GiB")
    assert build_plan(roomy, num_rows=1024, inputs=FLAT4, out_features=1).microbatch == 64
    full = _config(
        "train.global_batch_size=all", "train.microbatch_size=auto", "train.memory_budget=20KiB"
    )
    assert build_plan(full, num_rows=100, inputs=FLAT4, out_features=1).microbatch == 9


def test_auto_and_a_fixed_microbatch_give_the_same_parameters():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 4, generator=g), torch.randn(256, generator=g)
    results = []
    for m in ("auto", "64"):
        config = _config(f"train.microbatch_size={m}", "train.memory_budget=20KiB")
        plan = build_plan(config, num_rows=256, inputs=FLAT4, out_features=1)
        torch.manual_seed(0)
        model = build_model(config.model, 4, 1)
        opt = build_optimizer(config.optim, model.parameters())
        for step in range(plan.steps_per_epoch):
            rows = slice(step * plan.step_total, (step + 1) * plan.step_total)
            xs, ys = x[rows].split(plan.microbatch), y[rows].split(plan.microbatch)
            train_step(
                model, opt, list(zip(xs, ys)), plan.step_total, sync=GradSync(1), classify=False
            )
        results.append((plan.microbatch, [p.detach() for p in model.parameters()]))
    (m_auto, auto), (m_fixed, fixed) = results
    assert (m_auto, m_fixed) == (8, 64)  # 8 microbatches a step against 1
    for p, q in zip(auto, fixed):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
