"""Optimizer and learning-rate schedule from the [optim] section."""

from __future__ import annotations

import math

import torch

from raymb.config import OptimSection


def build_optimizer(section: OptimSection, params) -> torch.optim.Optimizer:
    """SGD (with momentum), Adagrad, Adam or AdamW, with weight decay."""
    lr, wd = section.lr, section.weight_decay
    if section.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=section.momentum, weight_decay=wd)
    if section.name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=wd)
    cls = torch.optim.Adam if section.name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=tuple(section.betas), weight_decay=wd)


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
