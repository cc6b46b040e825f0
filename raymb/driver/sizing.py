"""What the driver measures of the model before the plan: that a custom factory imports, and
the microbatch that fits train.memory_budget (train.microbatch_size = "auto").

Both need the model (torch, the user's factory); the plan (raymb.core.plan) is arithmetic and
takes the chosen microbatch size as a number. raymb.driver.preflight calls `build_plan` after
the data checks, before Ray starts; torch is imported only when a probe forward measures.
"""

from __future__ import annotations

import math

from raymb.config import Config
from raymb.core.plan import Plan
from raymb.core.shape import InputShape


def build_plan(config: Config, *, num_rows: int, inputs: InputShape, out_features: int) -> Plan:
    """The epoch's plan, its microbatch size resolved (`microbatch_size`)."""
    if ":" in config.model.name:
        # Import the user's model factory now: a typo costs one line, not a Ray start.
        from raymb.models import load_factory

        load_factory(config.model.name)
    m = microbatch_size(config, num_rows, inputs, out_features)
    return Plan.build(
        config, num_rows=num_rows, inputs=inputs, out_features=out_features, microbatch=m
    )


def microbatch_size(config: Config, num_rows: int, inputs: InputShape, out_features: int) -> int:
    """m: config.microbatch(), or where that depends on the memory ("auto", full batch
    without m) the one `auto_microbatch` measures on a worker's share of a step."""
    m = config.microbatch()
    if m is not None:
        return m
    W = config.scale.max_workers
    if num_rows < W:
        return 1  # fewer rows than workers: Plan.build refuses it, no probe needed
    G = config.train.global_batch_size
    share = -(-(num_rows if G == "all" else G) // W)  # a worker's most rows in a step
    return auto_microbatch(config, share, inputs, out_features)


def activation_bytes_per_sample(config: Config, inputs: InputShape, out_features: int) -> int:
    """Estimated training memory one sample costs: every module's output kept for the
    backward pass, and its gradient, in float32 (measured on a 2-row probe forward)."""
    import torch

    from raymb.models import build_model

    shape = inputs.model_shape
    model = build_model(config.model, shape, out_features)
    elements = [math.prod(shape)]

    def count(module, inputs, output) -> None:
        if torch.is_tensor(output):
            elements.append(output[0].numel())

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    probe = torch.zeros(2, *shape, dtype=torch.long if inputs.task == "lm" else torch.float32)
    with torch.no_grad():
        model(probe)
    for hook in hooks:
        hook.remove()
    return 2 * 4 * sum(elements)


def auto_microbatch(config: Config, share: int, inputs: InputShape, out_features: int) -> int:
    """train.microbatch_size = "auto" (and full batch without it) on a CPU: a worker's
    `share` of a step in the fewest microbatches whose activations fit train.memory_budget,
    of near-equal size (any split is exact): the share itself when it fits."""
    fits = max(
        1,
        config.train.memory_budget_bytes()
        // activation_bytes_per_sample(config, inputs, out_features),
    )
    k = -(-share // fits)
    return -(-share // k)
