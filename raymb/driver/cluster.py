"""The driver's side of Ray: start or join a cluster, cache the data in its object store, build
the TorchTrainer, and run it. The only driver module that imports Ray.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import sys
import threading
import traceback
from collections.abc import Iterator

import numpy as np
import ray

from raymb.config import Config
from raymb.data.checks import DatasetInfo, read_blocks
from raymb.data.columns import column_names
from raymb.driver import ray_compat, watchdog
from raymb.driver.logs import RayLog, divert
from raymb.errors import DataError
from raymb.storage import Location
from raymb.worker.spec import DataSpec

TRAINER_MODULES = ("ray.train.torch", "raymb.worker.epochs")
"""What the trainer needs on the driver (Ray Train, torch, the loop): seconds of imports that
connect() runs in a thread while Ray starts, not before it."""


def __getattr__(name: str):
    if name == "TrainingFailed":  # what fit() raises when the workers fail
        import ray.train

        return ray.train.TrainingFailedError
    raise AttributeError(name)


def worker_failures(error: BaseException) -> list[BaseException]:
    """What each failed worker raised, by rank (Ray Train's public WorkerGroupError carries
    them as raised, the worker's own class); none for another failure."""
    import ray.train

    if not isinstance(error, ray.train.WorkerGroupError):
        return []
    return [error.worker_failures[rank] for rank in sorted(error.worker_failures)]


def data_error(error: BaseException) -> str | None:
    """The message of a DataError a worker raised (the last rank's), if one did."""
    found = [str(e).strip() for e in worker_failures(error) if isinstance(e, DataError)]
    return found[-1] if found else None


def failure_line(error: BaseException) -> str:
    """One line for a failed fit: what the training code of the last failed rank raised, as
    its traceback's last line reads; Ray's own words for an error of Ray's (a worker that
    died, the controller)."""
    failures = worker_failures(error)
    last = failures[-1] if failures else error
    if failures and not type(last).__module__.startswith("ray."):
        text = "".join(traceback.format_exception_only(last))
    else:
        text = str(last)
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(last).__name__


def import_trainer_modules() -> threading.Thread:
    """Import TRAINER_MODULES in a thread; an import that fails raises again where it is used
    (an import of a module another thread is importing waits for it)."""

    def run() -> None:
        for name in TRAINER_MODULES:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - raised again by the import that needs it
                return

    thread = threading.Thread(target=run, name="raymb-imports", daemon=True)
    thread.start()
    return thread


LOCAL_OFF = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_METRICS_ENABLED")
"""Ray Train parts a local cluster has no use for: the preemption watcher (an actor process
that polls for spot-node notices) and its Prometheus metrics (no dashboard reads them). On
2 cores each costs start-up seconds of CPU (bench/startup.py); a joined cluster keeps both."""


def started_here() -> bool:
    """The Ray cluster this process is connected to is one it started itself (`ray.init()`
    with no address, as connect() and a test's session do), not one it joined. Such a cluster
    ends with the process, so make_trainer leaves out what it has no use for. A Ray worker (a
    Tune trial's driver) is never one."""
    return ray_compat.local_head()


@contextlib.contextmanager
def _env_defaults(values: dict[str, str]) -> Iterator[None]:
    """`values` set in this process's environment while the block runs, each unless the user
    set it (their setting wins), and the environment as it was afterwards. Ray Train reads
    them as fit() starts; the processes of a cluster started in the block inherit them (a
    sweep's trials)."""
    added = {name: value for name, value in values.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _ray_env(*, local: bool, fit: bool = False) -> dict[str, str]:
    """What raymb sets for Ray while it starts a cluster or fits: LOCAL_OFF off on a local
    cluster, Ray Train's print patch off in quiet mode (PRINT_PATCH_ENV), and with `fit` the
    controller's poll (POLL_ENV)."""
    env = dict.fromkeys(LOCAL_OFF, "0") if local else {}
    if RayLog.current is not None:
        env[PRINT_PATCH_ENV] = "0"
    if fit:
        from raymb.worker.worker import POLL_ENV, POLL_S

        env[POLL_ENV] = str(POLL_S)  # Ray passes it on to the controller that fit() starts
    return env


CACHE_SHARE = 0.25
"""data.cache = "auto" caches when the data takes at most this share of Ray's object store
and of the memory Ray may use."""


def connect(config: Config, address: str | None, *, ray_log: RayLog | None = None) -> float:
    """Start a local Ray cluster or join one; return the logical CPUs to give each worker.

    With `ray_log`, Ray's own lines go there instead of the terminal (raymb.driver.logs);
    without, Ray prints them as it does (--verbose). A local cluster that raymb starts gets
    a watchdog that ends it if this process is killed (raymb.driver.watchdog); a cluster it
    joins is never touched.

    A worker holding every CPU starves Ray Data's read tasks and the run waits forever, so
    the workers together leave at least one CPU free.
    """
    W = config.scale.max_workers
    RayLog.current = ray_log  # None: Ray's lines on the terminal, as Ray prints them
    if ray_log is not None:
        quiet()
    import_trainer_modules()  # make_trainer's imports wait for them
    if not ray.is_initialized():
        if address is None:
            with _env_defaults(_ray_env(local=True)):
                context = ray.init(
                    address="local",
                    num_cpus=max(os.cpu_count() or 1, W + 1),
                    include_dashboard=False,
                    log_to_driver=True,
                )
            watchdog.start(context.address_info["session_dir"])
        else:
            ray.init(address=address)
    if ray_log is not None:
        ray_log.announce()
    if config.scale.cpus_per_worker is not None:
        return config.scale.cpus_per_worker
    total = ray.cluster_resources().get("CPU", 0)
    return min(1.0, max(total - 1, total / 2) / W) if total else 1.0


session_dir = ray_compat.session_dir

PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
"""Ray Train turns a worker's print into a log record on stderr; off, the user's print stays
on stdout, where raymb tells it from Ray's lines. Ray Train passes it on to the workers."""


def quiet() -> None:
    """Send Ray's lines to RayLog.current from now on: what Ray forwards from its processes (the
    controller, the workers, Ray Data's tasks), the errors it publishes to the driver, and
    the console output of the driver's `ray` loggers; and Ray Train's print patch off while
    Ray starts and fits (PRINT_PATCH_ENV)."""
    import ray.data

    ray_compat.forward_lines(_to_ray_log)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if (name == "ray" or name.startswith("ray.")) and isinstance(logger, logging.Logger):
            divert(logger)
    if sys.stdout.isatty():  # Ray Data would draw its own bars; elsewhere it logs them
        ray.data.DataContext.get_current().enable_progress_bars = False


def _to_ray_log(data: dict) -> bool:
    """A batch of Ray's forwarded lines to the RayLog in use; False when none is."""
    sink = RayLog.current
    if sink is not None:
        sink.forwarded(data)
    return sink is not None


def use_cache(config: Config, infos: list[DatasetInfo | None]) -> bool:
    """data.cache, with "auto" resolved against what the cluster holds."""
    if config.data.cache != "auto":
        return bool(config.data.cache)
    size = sum(i.bytes for i in infos if i is not None)
    resources = ray.cluster_resources()
    room = min(resources.get("object_store_memory", 0), resources.get("memory", 0))
    # Each worker also keeps the rows as float32 tensors.
    rows = sum(i.num_rows * (i.num_features * _itemsize(i) + 8) for i in infos if i is not None)
    return size <= CACHE_SHARE * room and rows * config.scale.max_workers <= CACHE_SHARE * room


def _itemsize(info: DatasetInfo) -> int:
    """Bytes a feature value takes in a worker's cache: as stored, floats as float32."""
    kind = np.dtype(info.feature_type) if info.feature_type in np.sctypeDict else np.float32
    return 4 if np.issubdtype(kind, np.floating) else np.dtype(kind).itemsize


def data_spec(
    info: DatasetInfo, config: Config, cached: bool, what: str = "data.train"
) -> DataSpec:
    """What a worker needs to read a dataset (raymb.worker.feed): the blocks it fetches from
    Ray's object store, or the files to stream.

    A cached set is read into the object store by Ray tasks with pyarrow, a table a file, in
    file order (the row indices of raymb.core.order are positions in the files): one task per
    READ_TASK_BYTES of files, runs of consecutive files. This returns once they are
    submitted: the workers fetch the blocks when Ray Train has started them, and the read
    runs meanwhile. Ray Data's read of a small set here cost seconds more of CPU (its own
    execution and tasks; bench/startup.py). The tasks hold no CPU, so a run whose workers
    hold every CPU still gets its blocks.
    """
    if not cached:
        return DataSpec.of(info, config, what=what)
    columns = tuple(column_names(config.data.reads, config.data.label_column))
    files = tuple(info.files)
    tasks = min(len(files), max(1, -(-info.bytes // READ_TASK_BYTES)))
    blocks: list = []
    for k in range(tasks):
        run = files[k * len(files) // tasks : (k + 1) * len(files) // tasks]
        read = _read_files.options(name=f"raymb read {what}", num_returns=len(run))
        refs = read.remote(run, columns, info.filesystem, what)
        blocks.extend([refs] if len(run) == 1 else refs)
    return DataSpec.of(info, config, what=what, blocks=tuple(blocks))


READ_TASK_BYTES = 64 * 2**20
"""A cached set's files per read task: a small set is one task, one worker process."""


@ray.remote(num_cpus=0)
def _read_files(files, columns, filesystem, what):
    """Files of a cached set as tables, one return value each (raymb.data.checks)."""
    tables = read_blocks(files, columns, filesystem, what)
    return tables[0] if len(tables) == 1 else tables


def make_trainer(
    config: Config, loop, loop_config: dict, cpus: float, run_dir: Location, callbacks=()
):
    """The TorchTrainer of a run: its workers, storage, failures, checkpoints. Each worker
    writes its checkpoint files straight to run_dir's filesystem (Ray Train's upload).
    `callbacks`: Ray Train callbacks of the run (a sweep's trial reports to Ray Tune)."""
    import ray.train

    return _trainer(started_here())(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=(
                (config.scale.min_workers, config.scale.max_workers)
                if config.scale.elastic
                else config.scale.max_workers
            ),
            use_gpu=config.scale.use_gpu,
            resources_per_worker={"CPU": cpus} if not config.scale.use_gpu else None,
        ),
        run_config=ray.train.RunConfig(
            name=config.run.name,
            storage_path=run_dir.parent.path,
            storage_filesystem=None if run_dir.local else run_dir.fs,
            failure_config=ray.train.FailureConfig(max_failures=config.scale.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.checkpoint.keep,
                checkpoint_score_attribute=config.checkpoint.metric,
                checkpoint_score_order=config.checkpoint.order,
            ),
            callbacks=list(callbacks) or None,
        ),
    )


@functools.cache
def _trainer(local: bool) -> type:
    """TorchTrainer with _ray_env set while it fits; for a cluster that ends with this process
    (`local`) also without Ray Train's placement-group cleaner (ray_compat.without_cleaner)."""
    from ray.train.torch import TorchTrainer

    class Trainer(ray_compat.without_cleaner(TorchTrainer) if local else TorchTrainer):
        def fit(self):
            with _env_defaults(_ray_env(local=local, fit=True)):
                return super().fit()

    return Trainer
