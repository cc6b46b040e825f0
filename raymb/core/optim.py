"""Optimizer and learning-rate schedule from the [optim] section."""

from __future__ import annotations

import math

import torch

from raymb.config import OptimSection


def build_optimizer(section: OptimSection, params) -> torch.optim.Optimizer:
    """SGD (with momentum), Adagrad, Adam, AdamW or RMSprop, with weight decay; or L-BFGS
    with a strong-Wolfe line search (raymb.core.step.lbfgs_step drives it)."""
    lr, wd = section.lr, section.weight_decay
    if section.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=section.momentum, weight_decay=wd)
    if section.name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=wd)
    if section.name == "rmsprop":
        return torch.optim.RMSprop(
            params,
            lr=lr,
            alpha=section.alpha,
            eps=section.eps,
            weight_decay=wd,
            momentum=section.momentum,
            centered=section.centered,
        )
    if section.name == "lbfgs":
        return torch.optim.LBFGS(
            params,
            lr=lr,
            max_iter=section.max_iter,
            history_size=section.history_size,
            line_search_fn="strong_wolfe",
        )
    cls = torch.optim.Adam if section.name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=tuple(section.betas), weight_decay=wd)


def penalized(param: torch.Tensor) -> bool:
    """Whether optim.l1 shrinks this parameter: weights of 2 or more dimensions (linear,
    convolution, embedding), not biases or norms' scales and shifts (1-dimensional)."""
    return param.dim() >= 2


@torch.no_grad()
def l1_step(optimizer: torch.optim.Optimizer, l1: float) -> None:
    """The proximal step of lambda * |w|_1 after an optimizer step: every weight moves by
    lr * lambda towards 0 and stops there, w <- sign(w) max(|w| - lr lambda, 0), with each
    group's current lr (the schedule's). A subgradient term would leave weights jittering
    around 0; this makes them exactly 0, as a lasso does."""
    for group in optimizer.param_groups:
        threshold = group["lr"] * l1
        for p in group["params"]:
            if penalized(p):
                p.copy_(torch.nn.functional.softshrink(p, threshold))


def lr_factor(section: OptimSection, step: int, total_steps: int) -> float:
    """Multiplier of optim.lr for optimizer step `step` (0-based) of `total_steps`."""
    if step < section.warmup_steps:
        return (step + 1) / section.warmup_steps
    if section.schedule == "step":
        return section.gamma ** (step // section.step_size)
    if section.schedule == "cosine":
        span = max(1, total_steps - section.warmup_steps)
        progress = min(1.0, (step - section.warmup_steps) / span)
        floor = section.min_lr / section.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def build_scheduler(section: OptimSection, optimizer, total_steps: int):
    """A LambdaLR over lr_factor; its state (the step count) goes into checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(section, step, total_steps)
    )
