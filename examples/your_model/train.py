"""The same run from Python: raymb.train with the callables themselves, a closure among them
(cloudpickled to the workers as Ray carries a training function)."""

import torch
from my_parts import accuracy, two_inputs

import raymb


def capped_loss(cap: float):
    """weighted_loss with each weight capped at `cap`: a closure over cap."""

    def loss(outputs, targets):
        weight = targets["weight"].clamp(max=cap)
        ce = torch.nn.functional.cross_entropy(outputs, targets["label"], reduction="none")
        return ce * weight, weight

    return loss


if __name__ == "__main__":  # the local launcher starts its workers as new processes
    config = raymb.load_config("config.toml", ["run.name=my-model-py", "scale.launcher=local"])
    result = raymb.train(config, model=two_inputs, loss=capped_loss(1.5), metrics=accuracy)
    print(result.summary["val_acc"], result.summary["val_wacc"], result.summary["steps"])
