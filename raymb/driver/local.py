"""A run of raymb's epoch loop on a plain torch.distributed group, with no Ray.

The same checks, plan, loop, steps, sync, metrics and checkpoints as `raymb train`; the data is
read here with pyarrow and handed to every process whole (a TorchSession's cache), and the
checkpoints land in `<run dir>/checkpoint_<step>/`. For the numerics tests and the GPU checks,
which must drive the real loop on a machine without Ray.
"""

from __future__ import annotations

from pathlib import Path

from raymb.config import Config
from raymb.data.checks import DatasetInfo, read_blocks
from raymb.data.columns import column_names
from raymb.driver.launch import run_torch
from raymb.driver.preflight import prepare, run_location, tokenizer_spec
from raymb.rundir.checkpoint import MODEL_FILE
from raymb.worker.epochs import train_loop
from raymb.worker.session import TorchSession
from raymb.worker.spec import DataSpec, EpochsSpec, validation


def local_spec(config: Config) -> EpochsSpec:
    """The spec `raymb train` would send its workers, with the data cached from this process."""
    plan, train_info, val_info = prepare(config)
    columns = tuple(column_names(config.data.features, config.data.label_column))

    def cached(info: DatasetInfo, what: str) -> DataSpec:
        blocks = read_blocks(info.files, columns, info.filesystem, what)
        return DataSpec.of(info, config, what=what, blocks=blocks)

    train = cached(train_info, "data.train")
    val = cached(val_info, "data.val") if val_info else None
    return EpochsSpec(
        config=config,
        plan=plan,
        run_dir=run_location(config),
        train=train,
        val=validation(config, train, val),
        tokenizer=tokenizer_spec(config),
    )


def train_torch(config: Config, *, backend: str = "gloo") -> Path:
    """Train as configured on scale.workers local processes; return the final model.pt."""
    spec = local_spec(config)
    run_dir = Path(spec.run_dir.path)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_torch(_loop, (spec,), config.scale.max_workers, backend=backend)
    latest = TorchSession(run_dir).latest()
    if latest is None:
        raise RuntimeError(f"{run_dir}: the run wrote no checkpoint")
    return latest / MODEL_FILE


def _loop(spec: EpochsSpec, *, session_factory=TorchSession) -> None:
    train_loop({"spec": spec}, session_factory(Path(spec.run_dir.path)))


def lr_find_torch(config: Config, *, low: float, high: float, steps: int, backend: str = "gloo"):
    """`raymb lr-find` on scale.workers local processes: the same loop, curve and files in
    <run.storage_path>/<run.name>-lr-find/, with the same protection of that folder (its lock,
    its marker); returns raymb.driver.lr_find's result."""
    from raymb.driver.lr_find import lr_find

    return lr_find(config, low=low, high=high, steps=steps, backend=backend)
