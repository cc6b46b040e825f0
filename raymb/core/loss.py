"""The loss and the metrics: one definition each, for the step, the workers and `raymb eval`.

`summed_loss` is what a step adds up over its microbatches and divides by the step's rows (or
tokens): the loss of a step is the mean over its rows however they are cut (docs/design.md,
"Models and the loss"). raymb.core.objective builds on them: the one definition of a
step's loss and of a validation batch's sums (Objective.sums), for the workers and `raymb eval`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def summed_loss(output: torch.Tensor, target: torch.Tensor, classify: bool) -> torch.Tensor:
    """Sum over the microbatch of the per-sample loss: cross-entropy, or squared error.

    A classifier's output may be (B, T, V) for targets (B, T) (language modelling): the sum
    of the cross-entropy of every token.
    """
    if classify:
        if output.dim() > 2:
            output, target = output.reshape(-1, output.shape[-1]), target.reshape(-1)
        return nn.functional.cross_entropy(output, target, reduction="sum")
    return nn.functional.mse_loss(output.reshape(target.shape), target, reduction="sum")


def correct(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Number of argmax predictions equal to the label (of tokens, for (B, T, V) outputs)."""
    return (output.argmax(dim=-1) == target).sum()


def lm_metrics(loss: float | None, task: str, tokenizer: dict | None) -> dict[str, Any]:
    """Language modelling: val_perplexity (exp of the loss in nats per token) and, for the
    bytes tokenizer (a token is a byte), val_bits_per_byte; nothing for other tasks."""
    if task != "lm":
        return {}
    per_byte = tokenizer is not None and tokenizer.get("kind") == "bytes"
    return {
        "val_perplexity": None if loss is None else math.exp(min(loss, 700.0)),
        "val_bits_per_byte": loss / math.log(2) if loss is not None and per_byte else None,
    }
