"""train.microbatch_size = "auto" on a CPU: a worker's share of a step in the fewest
microbatches within the budget, and never a change of the math; full batch without m. Plain
Python and torch, no Ray."""

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


def test_auto_picks_the_fewest_microbatches_that_fit_by_hand():
    auto_20k = ("train.microbatch_size=auto", "train.memory_budget=20KiB")
    # mlp 4 -> 64 -> 64 -> 1 keeps, per sample: input 4, Linear 64, ReLU 64, Linear 64,
    # ReLU 64, Linear 1 = 261 floats, and as many gradients: 261 * 2 * 4 bytes = 2088.
    # 20 KiB = 20480 bytes holds 9 samples; G/W = 64 rows take ceil(64 / 9) = 8 microbatches,
    # of 64 / 8 = 8 rows.
    config = _config("train.microbatch_size=auto", "train.memory_budget=20KiB")
    plan = build_plan(config, num_rows=1024, inputs=FLAT4, out_features=1)
    assert plan.microbatch == 8 and plan.step_total == 64
    roomy = _config("train.microbatch_size=auto", "train.memory_budget=1GiB")
    assert build_plan(roomy, num_rows=1024, inputs=FLAT4, out_features=1).microbatch == 64
    full = _config(
        "train.global_batch_size=all", "train.microbatch_size=auto", "train.memory_budget=20KiB"
    )
    assert build_plan(full, num_rows=100, inputs=FLAT4, out_features=1).microbatch == 9
    # 97 rows (a prime: its only divisors 1 and 97) in ceil(97 / 9) = 11 microbatches of at
    # most ceil(97 / 11) = 9: 10 of 9 and one of 7, not 97 of 1.
    prime = _config("train.global_batch_size=97", *auto_20k)
    assert build_plan(prime, num_rows=1024, inputs=FLAT4, out_features=1).microbatch == 9


def test_full_batch_without_a_microbatch_takes_the_share_when_it_fits():
    # 101 rows on 2 workers: shares of 51 and 50 rows; 1 GiB holds 51 rows: one microbatch.
    full = ["train.global_batch_size=all", "scale.workers=2"]
    plan = build_plan(_config(*full), num_rows=101, inputs=FLAT4, out_features=1)
    assert plan.microbatch == 51
    # 20 KiB holds 9 of the 2088-byte rows: as "auto", ceil(51 / 9) = 6 microbatches of 9.
    tight = _config(*full, "train.memory_budget=20KiB")
    assert build_plan(tight, num_rows=101, inputs=FLAT4, out_features=1).microbatch == 9


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
