"""The built-in losses and the contract of a loss of your own, on one process, against torch's
own functional losses: a step's loss is sum / count, so the sums and counts of any cut of a
batch add up to torch's mean over the whole batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raymb.core.objective import LossError, Objective

F = nn.functional


def _mean(objective: Objective, out, y, cuts=(0, 3, 7, 12)) -> torch.Tensor:
    """sum / count over the batch cut into pieces, as the step adds them up."""
    total, count = torch.zeros(()), torch.zeros((), dtype=torch.float64)
    for a, b in zip(cuts, cuts[1:]):
        s, c = objective(out[a:b], y[a:b])
        total = total + s
        count = count + (c if c is not None else b - a)
    return total / count


def test_class_weights_are_torchs_weighted_mean() -> None:
    torch.manual_seed(0)
    out, y = torch.randn(12, 4), torch.randint(0, 4, (12,))
    w = [0.5, 2.0, 1.0, 3.0]
    got = _mean(Objective(classify=True, class_weights=w), out, y)
    want = F.cross_entropy(out, y, weight=torch.tensor(w))
    torch.testing.assert_close(got.float(), want)


def test_label_smoothing_is_torchs() -> None:
    torch.manual_seed(1)
    out, y = torch.randn(12, 5), torch.randint(0, 5, (12,))
    objective = Objective(classify=True, label_smoothing=0.2)
    assert not objective.counted  # one count a row: divided before the step, as today
    torch.testing.assert_close(
        _mean(objective, out, y).float(), F.cross_entropy(out, y, label_smoothing=0.2)
    )


def test_ignore_index_weights_and_smoothing_on_tokens_are_torchs() -> None:
    torch.manual_seed(2)
    out, y = torch.randn(12, 6, 5), torch.randint(0, 5, (12, 6))
    y[torch.rand(12, 6) < 0.3] = -100  # padding
    w = [1.0, 2.0, 0.5, 1.5, 1.0]
    objective = Objective(classify=True, class_weights=w, ignore_index=-100, label_smoothing=0.1)
    want = F.cross_entropy(
        out.reshape(-1, 5),
        y.reshape(-1),
        weight=torch.tensor(w),
        ignore_index=-100,
        label_smoothing=0.1,
    )
    torch.testing.assert_close(_mean(objective, out, y).float(), want)


def test_multi_label_is_torchs_binary_cross_entropy_with_logits() -> None:
    torch.manual_seed(3)
    out, y = torch.randn(12, 7), (torch.rand(12, 7) < 0.4).float()
    got = _mean(Objective(classify=True, bce=True), out, y)
    torch.testing.assert_close(got.float(), F.binary_cross_entropy_with_logits(out, y))


def test_a_loss_of_per_row_values_counts_one_a_row() -> None:
    out, y = torch.randn(12, 1), torch.randn(12)
    own = Objective(classify=False, loss=lambda o, t: (o.squeeze(1) - t) ** 2, loss_name="sq")
    torch.testing.assert_close(_mean(own, out, y).float(), F.mse_loss(out.squeeze(1), y))


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (lambda o, t: ((o.squeeze(1) - t) ** 2).mean(), "returned a loss of shape [] for 4 rows"),
        (lambda o, t: (o.squeeze(1), -torch.ones(4)), "returned a negative count (-1)"),
        (lambda o, t: (o.squeeze(1), torch.ones(3)), "returned a count of shape [3] for 4 rows"),
    ],
)
def test_a_loss_that_breaks_the_rule_is_one_line(loss, message) -> None:
    own = Objective(classify=False, loss=loss, loss_name="my.losses:bad")
    with pytest.raises(LossError) as info:
        own(torch.randn(4, 1), torch.randn(4))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert "'my.losses:bad'" in str(info.value)


def test_validation_sums_hold_the_metrics_as_sums_and_counts() -> None:
    torch.manual_seed(4)
    model = nn.Linear(3, 2)
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))

    def metrics(out, t):
        return {"pos": ((out.argmax(1) == 1).sum(), len(t))}

    objective = Objective(classify=True, metrics=metrics, metric_names=("pos",))
    sums = objective.sums(model, x[:4], y[:4]) + objective.sums(model, x[4:], y[4:])
    loss, count, hits, predicted, pos, pos_count = sums.tolist()
    out = model(x)
    assert loss / count == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-6)
    assert (hits, predicted) == ((out.argmax(1) == y).sum().item(), 10)
    assert (pos, pos_count) == ((out.argmax(1) == 1).sum().item(), 10)


def test_a_counted_step_takes_the_steps_of_the_rows_rule() -> None:
    """A loss of your own counting one a row is divided after the step (by its all-reduced
    count), the built-in before (by the rows): the same gradient, step and noise-scale
    measurement (W = 1, k = 2: the step's halves)."""
    from raymb.core.noise_probe import NoiseProbe
    from raymb.core.step import train_step
    from raymb.core.sync import GradSync

    torch.manual_seed(5)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    micro = [(x[:5], y[:5]), (x[5:], y[5:])]  # a short second microbatch
    per_row = Objective(
        classify=True, loss=lambda o, t: F.cross_entropy(o, t, reduction="none"), loss_name="ce"
    )
    results = []
    for objective in (Objective(classify=True), per_row):
        torch.manual_seed(6)
        model = nn.Linear(4, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        probe = NoiseProbe(1)
        train_step(model, opt, micro, 12, sync=GradSync(1), objective=objective, observer=probe)
        results.append((model.state_dict(), probe.pop()))
    (state_a, (sq_a, floats_a)), (state_b, (sq_b, floats_b)) = results
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key])
    torch.testing.assert_close(sq_a, sq_b)
    assert floats_a == pytest.approx(floats_b)


def test_validation_sums_add_up_over_batches() -> None:
    """(was raymb.core.loss.batch_sums's test: Objective.sums is now the one definition)"""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    objective = Objective(classify=True)
    whole = objective.sums(model, x, y)
    split = objective.sums(model, x[:3], y[:3]) + objective.sums(model, x[3:], y[3:])
    assert whole.dtype == torch.float64
    torch.testing.assert_close(whole, split)
    assert whole[1].item() == 10  # the count: the rows
