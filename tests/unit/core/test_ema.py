"""raymb.core.ema: the warm-up's decays, an update against one by hand, and the swap that
lends the model the average and gives its weights back."""

from __future__ import annotations

import torch

from raymb.core.ema import EMA


def test_warmup_ramps_the_decay_from_zero():
    ema = EMA(0.9, warmup_steps=4)
    assert [ema.decay_at(t) for t in range(6)] == [0.0, 0.225, 0.45, 0.675, 0.9, 0.9]
    assert EMA(0.9).decay_at(0) == 0.9


def test_update_and_swap():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(4.0)
    ema = EMA(0.75)
    ema.start(model)
    with torch.no_grad():
        model.weight.fill_(0.0)
        model.bias.fill_(0.0)
    ema.update(model)  # 0.75 x start + 0.25 x 0
    with ema.swapped(model):
        torch.testing.assert_close(model.weight, torch.tensor([[0.75, 1.5]]))
        torch.testing.assert_close(model.bias, torch.tensor([3.0]))
    assert model.weight.abs().sum() == 0 and model.bias.item() == 0  # its own weights back
    state = ema.state_dict()
    again = EMA(0.75)
    again.load_state_dict(state, torch.device("cpu"))
    assert again.updates == 1 and torch.equal(again.shadow["bias"], torch.tensor([3.0]))
