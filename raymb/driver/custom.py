"""Your model, loss and metrics, checked on a few rows before Ray starts (the dry run), and what
came from Python (raymb.train(model=, loss=, metrics=)) cloudpickled for the workers.

The dry run builds the model on this machine's CPU, reads the first rows of data.train, and
runs the forward, the loss and the metrics once: a column the model does not take, a loss of
the wrong shape, a negative count or a metrics function that returns no (sum, count) is one
line here, not a worker's traceback after Ray started. It also names the metrics, so that
every worker sums the same vector.
"""

from __future__ import annotations

from typing import Any

from raymb.config import Config
from raymb.config.sections import BUILT_IN_METRICS
from raymb.data.checks import DatasetInfo
from raymb.errors import ConfigError, one_line

DRY_RUN_ROWS = 4
"""Rows of data.train the dry run takes through the model, the loss and the metrics."""


def custom_code(
    config: Config,
    plan: Any,
    info: DatasetInfo,
    *,
    model: Any = None,
    loss: Any = None,
    metrics: Any = None,
):
    """The workers' Code (raymb.worker.spec): the Python callables, cloudpickled (one that
    cannot be is a ConfigError), and the metrics' names from a dry run. Nothing of your own
    in the run (the built-in model and loss, no metrics): no dry run."""
    from raymb.worker.spec import Code

    name = config.model.name
    if config.data.named is not None and model is None and name in ("linear", "mlp", "cnn", "gpt"):
        raise ConfigError(
            f"model.name = {name} takes one tensor (data.features), not data.inputs: use "
            'package.module:factory, model.name = "transformers", model= from Python, or '
            "data.features"
        )
    given = {"model": model, "loss": loss, "metrics": metrics}
    carried = {key: pickled(key, value) for key, value in given.items() if value is not None}
    own = (
        any(v is not None for v in given.values())
        or config.data.named is not None
        or not config.loss.builtin_default
        or config.metrics.name is not None
        or ":" in config.model.name
    )
    names = dry_run(config, plan, info, **given) if own else ()
    check_metric(config.checkpoint.metric, names, "checkpoint.metric")
    section = config.model
    if model is None and (getattr(section, "init_from", None) or getattr(section, "freeze", None)):
        check_pretrained(config, plan)
    return Code(**carried, metric_names=names)


def check_metric(metric: str, names: tuple[str, ...], key: str) -> None:
    """A val_<name> of checkpoint.metric or tune.metric must be one of the metrics that
    metrics.name (or metrics= from Python) returns: `names`, the dry run's."""
    if metric in BUILT_IN_METRICS or metric[len("val_") :] in names:
        return
    known = ", ".join([*BUILT_IN_METRICS, *(f"val_{name}" for name in names)])
    why = "" if names else " (no metrics of your own: set metrics.name)"
    raise ConfigError(f"{key}={metric!r} is not a metric of this run{why}; known: {known}")


def check_pretrained(config: Config, plan: Any) -> None:
    """model.init_from's names and shapes and model.freeze's patterns against the model, built
    on the meta device (no memory, no values): one line before Ray starts."""
    import torch

    from raymb.models.init_from import check_init
    from raymb.worker.spec import Shape
    from raymb.worker.worker import build_run_model

    with torch.device("meta"):
        probe = build_run_model(config, Shape(plan.input_shape, plan.out_features), None)
    check_init(probe, config.model)


def pickled(key: str, value: Any) -> bytes:
    """`value` cloudpickled, the functions and classes of your own modules (those not installed:
    a script's, a folder's beside it) by value, so that Ray's workers, which may not import
    them, need not; installed packages and raymb travel by reference."""
    import cloudpickle

    own = list(_own_modules())
    for module in own:
        cloudpickle.register_pickle_by_value(module)
    try:
        return cloudpickle.dumps(value)
    except Exception as e:  # any failure of pickling is the user's object's
        raise ConfigError(
            f"{key}= cannot be pickled for the workers ({one_line(e, 300)}): define it in a "
            "module, or close over values that pickle (no open files, locks or sockets)"
        ) from None
    finally:
        for module in own:
            cloudpickle.unregister_pickle_by_value(module)


def _own_modules():
    """Imported modules from files outside the interpreter's and its packages' folders."""
    import os
    import site
    import sys

    installed = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages()}
    installed.add(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # raymb's own
    installed = tuple(os.path.join(os.path.realpath(p), "") for p in installed if p)
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path or name == "__main__" or "." in name:
            continue  # __main__ travels by value anyway; a package's modules with it
        if not os.path.realpath(path).startswith(installed):
            yield module


def dry_run(
    config: Config, plan: Any, info: DatasetInfo, *, model=None, loss=None, metrics=None
) -> tuple[str, ...]:
    """The model, loss and metrics on the first DRY_RUN_ROWS rows of data.train, on the CPU;
    the metrics' names (sorted). A failure is a one-line ConfigError naming the part."""
    import pyarrow.parquet as pq
    import torch

    from raymb.core.objective import LossError, Objective
    from raymb.data.columns import column_names, table_to_tensors
    from raymb.worker.spec import Shape
    from raymb.worker.worker import build_run_model

    data = config.data
    columns = column_names(data.reads, data.label_column)
    with info.filesystem.open_input_file(info.files[0]) as f:
        first = next(pq.ParquetFile(f).iter_batches(batch_size=DRY_RUN_ROWS, columns=columns))
    import pyarrow as pa

    x, y = table_to_tensors(pa.Table.from_batches([first]), data.reads, data.label_column)
    inputs = plan.input_shape
    x, y = inputs.collate(x, y)
    shape = Shape(inputs, plan.out_features)
    torch.manual_seed(config.train.seed)
    try:
        net = build_run_model(config, shape, model)
    except (ConfigError, LossError):
        raise
    except Exception as e:  # the user's factory
        raise ConfigError(
            f"{_what_model(config, model)} failed to build: {one_line(e, 300)}"
        ) from None
    objective = Objective.of(config, shape.classify, loss=loss, metrics=metrics)
    net.eval()
    try:
        return _once(config, net, objective, x, y, model=model, metrics=metrics)
    finally:
        net.train()  # a module given from Python is the caller's own


def _once(config, net, objective, x, y, *, model, metrics) -> tuple[str, ...]:
    import torch

    from raymb.core import batch
    from raymb.core.objective import LossError, metric_names

    with torch.no_grad():
        try:
            out = batch.forward(net, x)
        except Exception as e:
            took = ", ".join(x) if isinstance(x, dict) else "one tensor (data.features)"
            raise ConfigError(
                f"{_what_model(config, model)} failed on {batch.rows(y)} rows of data.train, "
                f"given {took}: {one_line(e, 300)}"
            ) from None
        try:
            objective(out, y)
        except LossError:
            raise
        except Exception as e:
            raise ConfigError(
                f"the loss ({objective.loss_name}) failed: {one_line(e, 300)}"
            ) from None
        if objective.metrics is None:
            return ()
        key = "metrics=" if metrics is not None else "metrics.name"
        try:
            names = metric_names(objective.metrics, out, y, key)
            objective.metric_names = names  # each named metric is a (sum, count)
            objective._metric_values(out, y, torch.device("cpu"))
        except LossError:
            raise
        except Exception as e:
            raise ConfigError(f"{key} failed: {one_line(e, 300)}") from None
    return names


def _what_model(config: Config, model: Any) -> str:
    return "model=" if model is not None else f"model.name {config.model.name!r}"
