"""The config's sections but [model] (raymb.config.model) and [data] (raymb.config.data): one
frozen, keyword-only pydantic dataclass per TOML table, each field documented by the docstring
under it and checked, with the checks pydantic cannot express, in __post_init__.
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Annotated, Literal

from annotated_types import Ge, Gt, Interval, Le
from pydantic.types import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from raymb.config.build import MAX_EPOCHS, MAX_SEED, MAX_STEPS, Fraction, require, section
from raymb.errors import ConfigError

RUN_NAME = "a plain folder name (non-empty, no leading '.', no '/' or '\\', no control characters)"


@section("run")
class RunSection:
    """Where the run lives."""

    name: str = "default"
    """Run directory name under storage_path, a plain folder name (no leading '.', no '/' or
    '\\', no control characters); starting a run whose name exists resumes it."""
    storage_path: str = "runs"
    """Where run directories live: a local path (shared between nodes on a cluster) or an
    object-store URI (s3://bucket/prefix, gs://..., any URI pyarrow's filesystems resolve)."""

    def __post_init__(self) -> None:
        name = self.name
        require(plain_name(name), "run.name", RUN_NAME, name)
        size = len(name.encode("utf-8", "surrogatepass"))
        require(size <= 255, "run.name", f"at most 255 bytes long, not {size}", name)
        require(bool(self.storage_path), "run.storage_path", "a path or URI", self.storage_path)


def plain_name(name: str) -> bool:
    """Whether `name` names one folder inside its parent: not the parent itself, not above
    it, not hidden (raymb writes hidden siblings while it works), nothing a line would break on."""
    return (
        bool(name)
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and name.isprintable()  # no control, format or line-separator characters
    )


@section("storage")
class StorageSection:
    """How object-store URIs (run.storage_path, data.train, data.val) are reached. Credentials
    come from the environment only (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...; a Secret on
    Kubernetes): a config is saved with every run and checkpoint."""

    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, moto, ...); unset: $AWS_ENDPOINT_URL, else AWS."""
    region: str | None = None
    """S3 region; unset: $AWS_REGION / $AWS_DEFAULT_REGION, else the bucket's own."""

    def __post_init__(self) -> None:
        url = self.endpoint_url
        what = "a URL such as http://127.0.0.1:9000"
        require(url is None or "://" in url, "storage.endpoint_url", what, url)


@section("optim")
class OptimSection:
    """The optimizer, its learning-rate schedule and the L1 penalty."""

    name: Literal["sgd", "adagrad", "adam", "adamw", "rmsprop", "lbfgs"] = "sgd"
    """torch.optim's SGD (with optim.momentum), Adagrad, Adam or AdamW (with optim.betas),
    RMSprop (optim.alpha, eps, momentum, centered) or L-BFGS with a strong-Wolfe line search
    (optim.max_iter, history_size; full batch only: train.global_batch_size = "all" under
    train.sync = "grad"; optim.lr = 1 is its usual step)."""
    lr: PositiveFloat | None = None
    """Learning rate: the peak, reached after the warm-up; unset: 0.05, or 1 for lbfgs
    (torch's L-BFGS default; --print-config shows the value taken)."""
    momentum: Fraction = 0.9
    """SGD and RMSprop momentum (ignored by the other optimizers; 0 is torch's plain
    RMSprop)."""
    weight_decay: NonNegativeFloat = 0.0
    """Weight decay as torch.optim takes it (an L2 term in the gradient; decoupled for adamw)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam and AdamW betas."""
    alpha: Fraction = 0.99
    """RMSprop: the smoothing constant of the running mean of squared gradients."""
    eps: PositiveFloat = 1e-8
    """RMSprop: added to the root of that running mean before dividing by it."""
    centered: bool = False
    """RMSprop: divide by the gradient's running standard deviation (the mean of squares
    less the squared running mean) instead of its root mean square."""
    l1: NonNegativeFloat = 0.0
    """L1 penalty lambda, as a proximal step: after each optimizer step every weight (a
    parameter of 2 or more dimensions: not biases, not norms' scales and shifts) is
    soft-thresholded by lr x lambda, so that weights a lasso would zero become exactly 0."""
    max_iter: PositiveInt = 20
    """lbfgs: at most this many iterations an optimizer step, and 1.25 x as many loss and
    gradient evaluations over the whole data set."""
    history_size: PositiveInt = 100
    """lbfgs: the (step, gradient change) pairs kept for the inverse-Hessian estimate."""
    schedule: Literal["constant", "cosine", "step"] = "constant"
    """The learning rate after the warm-up: constant; cosine, from lr down to min_lr at the
    last step; step, multiplied by gamma every step_size steps."""
    warmup_steps: NonNegativeInt = 0
    """Linear warm-up from 0 to lr over this many optimizer steps."""
    step_size: PositiveInt = 100
    """step schedule: multiply lr by gamma every step_size optimizer steps."""
    gamma: Annotated[float, Interval(gt=0, le=1)] = 0.1
    """step schedule: the factor lr is multiplied by every step_size optimizer steps."""
    min_lr: NonNegativeFloat = 0.0
    """cosine schedule: lr at the last step."""
    grad_clip: PositiveFloat | None = None
    """Clip the global gradient norm to this value; unset for no clipping."""

    def __post_init__(self) -> None:
        if self.lr is None:  # frozen: the default the optimizer calls for, set once here
            object.__setattr__(self, "lr", 1.0 if self.name == "lbfgs" else 0.05)
        betas = self.betas
        ok = len(betas) == 2 and all(0 <= b < 1 for b in betas)
        require(ok, "optim.betas", "two values in [0, 1)", betas)
        require(self.min_lr <= self.lr, "optim.min_lr", "in [0, optim.lr]", self.min_lr)
        if self.name == "lbfgs":
            # Its line search needs the loss whose gradient it follows: no clipped gradient,
            # no decay or proximal step outside the loss it evaluates.
            why = 'with optim.name = "lbfgs" (its line search follows the loss alone)'
            require(self.grad_clip is None, "optim.grad_clip", f"unset {why}", self.grad_clip)
            require(self.weight_decay == 0, "optim.weight_decay", f"0 {why}", self.weight_decay)
            require(self.l1 == 0, "optim.l1", f"0 {why}", self.l1)


@section("train.early_stopping")
class EarlyStopping:
    """Stop when checkpoint.metric has stopped improving."""

    patience: PositiveInt | None = None
    """Stop after this many validations without improving checkpoint.metric; unset: never."""
    min_delta: NonNegativeFloat = 0.0
    """An improvement smaller than this does not count."""


@section("train")
class TrainSection:
    """Batches, epochs, synchronisation and numerics of the training loop."""

    global_batch_size: int | Literal["all"] = 64
    """G: samples per optimizer step across all workers; "all" is full-batch gradient descent."""
    microbatch_size: int | Literal["auto"] | None = None
    """m: samples per forward/backward on one worker, at most a worker's share of a step
    (G / workers, rounded up), which is cut into microbatches of m, the last short (exact
    whatever the split); unset: the share (no accumulation; with G = "all", the share when
    its estimated activations fit train.memory_budget, else "auto"); "auto": the fewest
    microbatches, of near-equal size, whose estimated activations (a probe forward of the
    model) fit train.memory_budget."""
    memory_budget: str = "1GiB"
    """Activation memory a microbatch may use when microbatch_size = "auto" (e.g. 512MiB)."""
    epochs: Annotated[int, Gt(0), Le(MAX_EPOCHS)] = 5
    """Passes over data.train (at most 2**31 - 1)."""
    max_steps: Annotated[int, Gt(0), Le(MAX_STEPS)] | None = None
    """Stop after this many optimizer steps in total (counting steps of earlier attempts)."""
    seed: Annotated[int, Ge(0), Le(MAX_SEED)] = 0
    """Seeds the model's initialisation, the workers' random numbers and each epoch's row
    order (0 to 2**53 - 1)."""
    sync: Literal["grad", "param", "diloco"] = "grad"
    """grad: DDP gradient all-reduce every step; param: local SGD, parameters averaged every
    average_every steps; diloco: local inner steps, then an outer step on the averaged
    pseudo-gradient (see [outer])."""
    average_every: PositiveInt = 8
    """H: local steps between two averagings (param, diloco)."""
    local_sgd_warmup: NonNegativeInt = 0
    """param: the first this many steps use gradient all-reduce (post-local SGD)."""
    average_optimizer_state: bool = False
    """param: also average momentum and Adam moments when averaging parameters."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16: forward and loss under bfloat16 autocast (parameters and gradients stay fp32)."""
    deterministic: bool = True
    """The row order is always a function of train.seed and the epoch; true also makes torch
    pick deterministic kernels where it has them (torch.use_deterministic_algorithms, warning
    where it has none), so runs repeat bitwise on GPUs too."""
    on_nan: Literal["abort", "skip"] = "abort"
    """A non-finite loss on any worker: abort the run (the last checkpoint stays), or skip
    that step on every worker and count it."""
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    ema_decay: Annotated[float, Interval(gt=0, lt=1)] | None = None
    """Keep an exponential moving average of the weights, in float32, updated after every
    optimizer step: ema = d x ema + (1 - d) x weights, from the weights training starts from.
    Validation and a checkpoint's model.pt (what eval, predict, export and model.init_from
    read) use the average; state.pt keeps the weights training goes on from. train.sync =
    "grad" only (docs/design.md). Unset: no average."""
    ema_warmup_steps: NonNegativeInt = 0
    """ema_decay: over the first this many updates the decay ramps linearly from 0 (update t
    uses ema_decay x t / ema_warmup_steps), so the average does not cling to the initial
    weights."""
    noise_scale: bool = False
    """Estimate the gradient noise scale B_simple (the critical batch, McCandlish et al. 2018)
    from the squared gradient norms of one worker's rows (before the gradient all-reduce)
    and of the step's (after it): grad_noise_scale in metrics.csv and summary.json, a line
    in the result table when G is far from it. train.sync = "grad" only; one worker needs
    two or more microbatches a step. Changes no parameter (docs/advice.md)."""
    log_every: PositiveInt = 10
    """A row of metrics.csv every this many steps, its train_loss the mean over those steps
    (rows are gathered and written about once a second, so 1 costs little); summary.json's
    train_loss is the mean over the last log_every steps (or the last epoch's, if fewer)."""

    def __post_init__(self) -> None:
        G, m = self.global_batch_size, self.microbatch_size
        require(G == "all" or G > 0, "train.global_batch_size", 'a positive integer or "all"', G)
        require(m in (None, "auto") or m > 0, "train.microbatch_size", '> 0 or "auto"', m)
        budget, size = self.memory_budget, 'a size such as "512MiB" or "2GiB"'
        require(parse_bytes(budget) is not None, "train.memory_budget", size, budget)
        if isinstance(m, int) and G != "all" and m > G:
            raise ConfigError(
                f"train.microbatch_size={m} is larger than train.global_batch_size={G}"
            )

    def memory_budget_bytes(self) -> int:
        return parse_bytes(self.memory_budget)


@section("scale")
class ScaleSection:
    """How many workers train, on what."""

    workers: int | list[int] = 2
    """Training workers; [min, max]: elastic (Ray Train starts with as many as the cluster
    has room for, at least min, and restarts from the latest checkpoint at a new size when
    nodes come or go; the steps' rows do not depend on the number, so under grad sync the
    numbers do not either)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL; otherwise CPU workers with gloo."""
    max_failures: NonNegativeInt = 0
    """Worker-group restarts from the last checkpoint before the run fails."""
    cpus_per_worker: PositiveFloat | None = None
    """Logical CPUs per worker; unset: chosen so Ray Data keeps a CPU to read with."""
    launcher: Literal["ray", "local"] = "ray"
    """What starts the workers: "ray" (Ray Train, on a local cluster raymb starts or the one
    joined); "local" (`raymb train --local`): scale.workers processes of a gloo (NCCL on GPUs)
    group on this machine, no Ray, the data read into memory, the same numbers and run
    directory (a run resumes under either); no failure restarts, elastic workers or --follow."""

    def __post_init__(self) -> None:
        w = self.workers
        if isinstance(w, list):
            what = "a number > 0 or [min, max] with 0 < min <= max"
            require(len(w) == 2 and 0 < w[0] <= w[1], "scale.workers", what, w)
        require(self.max_workers > 0, "scale.workers", "> 0", w)
        local = 'one number with scale.launcher = "local" (elastic workers need Ray)'
        require(self.launcher == "ray" or not self.elastic, "scale.workers", local, w)

    @property
    def elastic(self) -> bool:
        return isinstance(self.workers, list) and self.workers[0] < self.workers[1]

    @property
    def min_workers(self) -> int:
        return self.workers[0] if isinstance(self.workers, list) else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers[1] if isinstance(self.workers, list) else self.workers


@section("checkpoint")
class CheckpointSection:
    """When checkpoints are written and which are kept."""

    every_steps: PositiveInt | None = None
    """Also checkpoint every this many optimizer steps (always: each epoch's end, and the end)."""
    keep: PositiveInt = 2
    """Checkpoints kept: the best by `metric`; the latest is always kept too."""
    metric: str = "val_loss"
    """The metric of the best checkpoint (and of early stopping): val_loss, train_loss,
    val_accuracy, or val_<name> of a metric of your own (metrics.name's, checked against
    what it returns before Ray starts; needs checkpoint.mode); unset with no data.val:
    train_loss."""
    mode: Literal["auto", "min", "max"] = "auto"
    """Whether the best checkpoint has the least or the most of checkpoint.metric; auto: max
    for val_accuracy, min for the losses (a metric of your own needs min or max)."""
    min_interval_s: NonNegativeFloat = 10.0
    """Skip an epoch-end checkpoint (and its validation) that comes sooner than this after the
    last checkpoint, under train.sync = "grad" (where skipping changes no number); every_steps
    and the last step always checkpoint. 0: every epoch's end."""

    def __post_init__(self) -> None:
        metric_order(self.metric, self.mode, "checkpoint")

    @property
    def order(self) -> str:
        """checkpoint.mode resolved: "min" or "max"."""
        return metric_order(self.metric, self.mode, "checkpoint")


BUILT_IN_METRICS = {"val_loss": "min", "train_loss": "min", "val_accuracy": "max"}
"""The metrics every run can be judged by, and which way is better."""
OWN_METRIC = "val_<name> of a metric of your own (metrics.name)"


def metric_order(metric: str, mode: str | None, table: str) -> str:
    """Which way `metric` is better: `mode` ("min", "max"; "auto" or None: the built-in
    metric's way). A metric of your own must say; `table` names the keys (checkpoint, tune)."""
    known = ", ".join(BUILT_IN_METRICS) + f" or {OWN_METRIC}"
    own = metric.startswith("val_") and metric[4:].isidentifier()
    require(metric in BUILT_IN_METRICS or own, f"{table}.metric", known, metric)
    if mode in ("min", "max"):
        return mode
    if metric in BUILT_IN_METRICS:
        return BUILT_IN_METRICS[metric]
    raise ConfigError(
        f'{table}.mode must be "min" or "max" with {table}.metric = "{metric}" (a metric of '
        "your own: say whether less or more is better)"
    )


@section("log")
class LogSection:
    """Experiment tracking beside metrics.csv: TensorBoard event files, an MLflow server."""

    tensorboard: bool = False
    """Write TensorBoard event files into the run directory's tensorboard/ (every metrics.csv
    column by step, the config as hyper-parameters)."""
    mlflow_uri: str | None = None
    """MLflow tracking server (http://host:5000) for params, metrics per step, summary.json
    and the best model; unset: $MLFLOW_TRACKING_URI if set, else no MLflow. Needs
    pip install 'raymb[mlflow]'."""
    mlflow_experiment: str = "raymb"
    """The MLflow experiment the run is logged under (created when missing)."""


@section("outer")
class OuterSection:
    """DiLoCo's outer optimizer, stepping the global parameters on the averaged
    pseudo-gradient (theta_global - theta_local) every train.average_every steps."""

    name: Literal["sgd"] = "sgd"
    """The outer optimizer: SGD, as in DiLoCo."""
    lr: PositiveFloat = 0.7
    """Outer learning rate, applied to the averaged pseudo-gradient."""
    momentum: Fraction = 0.9
    """Outer momentum."""
    nesterov: bool = True
    """Nesterov momentum (DiLoCo's choice); false when momentum = 0."""

    def __post_init__(self) -> None:
        what, nesterov = "false when momentum = 0", self.nesterov
        require(not nesterov or self.momentum > 0, "outer.nesterov", what, nesterov)


@section("fault")
class FaultSection:
    """Fault injection for tests and drills; each fault fires once per run directory."""

    kill_worker_at_step: PositiveInt | None = None
    """Kill the worker process of `rank` when it reaches this optimizer step."""
    nan_at_step: PositiveInt | None = None
    """Make the loss of `rank` non-finite at this optimizer step."""
    rank: NonNegativeInt = 0
    """The worker the faults hit."""


_UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_bytes(text: str) -> int | None:
    """'512MiB' -> 536870912; None when the text is not a size."""
    number = text.strip().lower().rstrip("bikmg")
    unit = text.strip().lower()[len(number) :] or "b"
    try:
        value = float(number)
    except ValueError:
        return None
    if unit not in _UNITS or not 0 < value * _UNITS[unit] < math.inf:  # no inf, nan, 1e400
        return None
    return int(value * _UNITS[unit])
