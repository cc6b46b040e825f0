"""The run configuration: one frozen, keyword-only pydantic dataclass per TOML section.

pydantic checks types and bounds as a config is built (and writes the JSON Schema editors
check a config file against); every user mistake in a config file or a `--set` override
surfaces here as a one-line `ConfigError` naming the key and the value it got, before Ray
starts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

from annotated_types import Ge, Gt, Interval, Le
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic.types import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from raymb.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def _section(where: str, **config: Any) -> Callable[[type[T]], type[T]]:
    """A config section named `where`: a frozen, keyword-only pydantic dataclass whose
    ValidationErrors become one-line ConfigErrors, however it is built."""

    def make(cls: type[T]) -> type[T]:
        # strict: no "5" for 5 and no true for 1 (an int is still taken for a float); extra:
        # an unknown key is an error; no inf or nan in any float (none has a use for them);
        # the docstring under a field describes it in the schema.
        checked = ConfigDict(
            strict=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True
        )
        cls = dataclass(frozen=True, kw_only=True, config=ConfigDict(**checked, **config))(cls)
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: T, **values: Any) -> None:
            try:
                init(self, **values)
            except ValidationError as e:
                raise _error(cls, where, values, e.errors()[0]) from None

        cls.__init__ = __init__
        return cls

    return make


Fraction = Annotated[float, Interval(ge=0, lt=1)]

# What the numbers are handed to can take: the worker seeds torch with seed * 1000 + rank
# (at most 2**64 - 1), and a seed stays exact as a JSON or TensorBoard float (2**53 - 1);
# epochs x steps per epoch (up to 2**32 of them) and the step counter stay in an int64.
MAX_SEED = 2**53 - 1
MAX_EPOCHS = 2**31 - 1
MAX_STEPS = 2**63 - 1
_LIMITS = {MAX_SEED, MAX_EPOCHS, MAX_STEPS}

RUN_NAME = "a plain folder name (non-empty, no leading '.', no '/' or '\\', no control characters)"


@_section("run")
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
        _require(plain_name(name), "run.name", RUN_NAME, name)
        size = len(name.encode("utf-8", "surrogatepass"))
        _require(size <= 255, "run.name", f"at most 255 bytes long, not {size}", name)
        _require(bool(self.storage_path), "run.storage_path", "a path or URI", self.storage_path)


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


@_section("storage")
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
        _require(url is None or "://" in url, "storage.endpoint_url", what, url)


@_section("data")
class DataSection:
    """The training and validation data (parquet) and how it is read."""

    train: str = "data/linear/train"
    """Parquet file, directory, glob or URI of the training set."""
    val: str | None = "data/linear/val"
    """Validation set, evaluated at each epoch's end; unset for none (and unset by default
    when data.train is set without it)."""
    features: Union[str, list[str]] = "features"
    """One list-of-numbers column, or a list of scalar columns."""
    label: str = "label"
    """Integer label: classification; float label: regression."""
    shuffle: Literal["rows", "files", "none"] = "rows"
    """Each epoch's row order, a pure function of (train.seed, epoch): rows: a fresh
    permutation of every row; files: the files in a fresh order, rows in file order (for data
    too large to cache); none: the same order every epoch."""
    cache: Union[bool, Literal["auto"]] = "auto"
    """Read the data once and serve every epoch from memory (exact, index-based order);
    false streams every epoch through Ray Data; auto: cache when it fits comfortably (a
    quarter of Ray's object store and of its memory)."""

    task: Literal["auto", "classify", "regress", "lm"] = "auto"
    """auto: classify for an integer label, regress for a floating one; lm: language
    modelling on a column of token blocks (input = block[:-1], target = block[1:], the loss a
    mean over tokens; data.label is not read). A prepared folder's manifest sets it."""
    scale: PositiveFloat | None = None
    """Multiply the feature values by this in the collate (e.g. 1/255 for uint8 images; a
    prepared image folder's manifest sets it)."""
    mean: list[float] | None = None
    """Per-channel mean subtracted after data.scale (channels first), with data.std."""
    std: list[float] | None = None
    """Per-channel standard deviation divided by after data.mean."""

    @property
    def label_column(self) -> str | None:
        """The label column read, None for language modelling (the blocks are the target)."""
        return None if self.task == "lm" else self.label

    def __post_init__(self) -> None:
        features, mean, std = self.features, self.mean, self.std
        _require(features != [], "data.features", "a column name or a non-empty list", features)
        if (mean is None) != (std is None) or mean is not None and len(mean) != len(std):
            raise ConfigError(
                "data.mean and data.std must be set together, one value per channel each "
                f"(got mean={mean!r}, std={std!r})"
            )
        _require(std is None or all(s > 0 for s in std), "data.std", "positive values", std)
        lm = 'one column of token blocks when data.task = "lm"'
        _require(self.task != "lm" or isinstance(features, str), "data.features", lm, features)


BUILTIN_MODELS = ("linear", "mlp", "cnn", "gpt")


@_section("model")
class ModelSection:
    """The model: a built-in family or a factory of your own."""

    name: str = "linear"
    """linear, mlp, cnn, gpt, or package.module:factory (called as factory(in_features,
    out_features) for flat features, factory(input_shape, out_features) for tensor columns;
    out_features is the vocabulary size for data.task = "lm")."""
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layer widths of the mlp."""
    num_classes: Annotated[int, Ge(2)] | None = None
    """Classes of a classifier; unset: max label + 1."""
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    """cnn: channels of each residual stage (each stage after the first halves the image)."""
    norm: Literal["batch", "group"] = "batch"
    """cnn: BatchNorm (statistics depend on how a step is cut into microbatches: the
    equivalence contract does not hold) or GroupNorm (exact)."""
    depth: PositiveInt = 4
    """gpt: transformer blocks."""
    width: PositiveInt = 128
    """gpt: embedding width (a multiple of model.heads)."""
    heads: PositiveInt = 4
    """gpt: attention heads."""
    block_size: PositiveInt | None = None
    """gpt: longest context (positions); unset: the data's block (tokens per row - 1)."""
    dropout: Fraction = 0.0
    """gpt: dropout rate (0 keeps the equivalence contract exact)."""

    def __post_init__(self) -> None:
        name, hidden, widths = self.name, self.hidden, self.widths
        names = ", ".join(BUILTIN_MODELS) + " or package.module:factory"
        _require(name in BUILTIN_MODELS or ":" in name, "model.name", names, name)
        _require(all(h > 0 for h in hidden), "model.hidden", "positive layer widths", hidden)
        what = "a non-empty list of positive channel counts"
        _require(bool(widths) and all(w > 0 for w in widths), "model.widths", what, widths)
        what = f"a multiple of model.heads={self.heads}"
        _require(self.width % self.heads == 0, "model.width", what, self.width)


@_section("optim")
class OptimSection:
    """The optimizer and its learning-rate schedule."""

    name: Literal["sgd", "adagrad", "adam", "adamw"] = "sgd"
    lr: PositiveFloat = 0.05
    momentum: Fraction = 0.9
    """SGD momentum (ignored by the other optimizers)."""
    weight_decay: NonNegativeFloat = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam and AdamW betas."""
    schedule: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: NonNegativeInt = 0
    """Linear warm-up from 0 to lr over this many optimizer steps."""
    step_size: PositiveInt = 100
    """step schedule: multiply lr by gamma every step_size optimizer steps."""
    gamma: Annotated[float, Interval(gt=0, le=1)] = 0.1
    min_lr: NonNegativeFloat = 0.0
    """cosine schedule: lr at the last step."""
    grad_clip: PositiveFloat | None = None
    """Clip the global gradient norm to this value; unset for no clipping."""

    def __post_init__(self) -> None:
        betas = self.betas
        ok = len(betas) == 2 and all(0 <= b < 1 for b in betas)
        _require(ok, "optim.betas", "two values in [0, 1)", betas)
        _require(self.min_lr <= self.lr, "optim.min_lr", "in [0, optim.lr]", self.min_lr)


@_section("train.early_stopping")
class EarlyStopping:
    """Stop when checkpoint.metric has stopped improving."""

    patience: PositiveInt | None = None
    """Stop after this many validations without improving checkpoint.metric; unset: never."""
    min_delta: NonNegativeFloat = 0.0
    """An improvement smaller than this does not count."""


@_section("train")
class TrainSection:
    """Batches, epochs, synchronisation and numerics of the training loop."""

    global_batch_size: Union[int, Literal["all"]] = 64
    """G: samples per optimizer step across all workers; "all" is full-batch gradient descent."""
    microbatch_size: Union[int, Literal["auto"], None] = None
    """m: samples per forward/backward on one worker; unset: G / workers (no accumulation);
    "auto": the largest that keeps k whole and whose estimated activations (a probe forward
    of the model) fit train.memory_budget."""
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
    log_every: PositiveInt = 10
    """A row of metrics.csv every this many steps (rows are gathered and written about once a
    second, so 1 costs little)."""

    def __post_init__(self) -> None:
        G, m = self.global_batch_size, self.microbatch_size
        _require(G == "all" or G > 0, "train.global_batch_size", 'a positive integer or "all"', G)
        _require(m in (None, "auto") or m > 0, "train.microbatch_size", '> 0 or "auto"', m)
        budget, size = self.memory_budget, 'a size such as "512MiB" or "2GiB"'
        _require(parse_bytes(budget) is not None, "train.memory_budget", size, budget)
        if isinstance(m, int) and G != "all" and m > G:
            raise ConfigError(
                f"train.microbatch_size={m} is larger than train.global_batch_size={G}"
            )
        what = 'set (a number or "auto") when train.global_batch_size = "all"'
        _require(G != "all" or m is not None, "train.microbatch_size", what, m)

    def memory_budget_bytes(self) -> int:
        return parse_bytes(self.memory_budget)


@_section("scale")
class ScaleSection:
    """How many workers train, on what."""

    workers: Union[int, list[int]] = 2
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

    def __post_init__(self) -> None:
        w = self.workers
        if isinstance(w, list):
            what = "a number > 0 or [min, max] with 0 < min <= max"
            _require(len(w) == 2 and 0 < w[0] <= w[1], "scale.workers", what, w)
        _require(self.max_workers > 0, "scale.workers", "> 0", w)

    @property
    def elastic(self) -> bool:
        return isinstance(self.workers, list) and self.workers[0] < self.workers[1]

    @property
    def min_workers(self) -> int:
        return self.workers[0] if isinstance(self.workers, list) else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers[1] if isinstance(self.workers, list) else self.workers


@_section("checkpoint")
class CheckpointSection:
    """When checkpoints are written and which are kept."""

    every_steps: PositiveInt | None = None
    """Also checkpoint every this many optimizer steps (always: each epoch's end, and the end)."""
    keep: PositiveInt = 2
    """Checkpoints kept: the best by `metric`; the latest is always kept too."""
    metric: Literal["val_loss", "train_loss", "val_accuracy"] = "val_loss"
    """The metric of the best checkpoint (and of early stopping); unset with no data.val:
    train_loss."""
    min_interval_s: NonNegativeFloat = 10.0
    """Skip an epoch-end checkpoint (and its validation) that comes sooner than this after the
    last checkpoint, under train.sync = "grad" (where skipping changes no number); every_steps
    and the last step always checkpoint. 0: every epoch's end."""

    @property
    def mode(self) -> str:
        return "max" if self.metric == "val_accuracy" else "min"


@_section("log")
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


@_section("outer")
class OuterSection:
    """DiLoCo's outer optimizer, stepping the global parameters on the averaged
    pseudo-gradient (theta_global - theta_local) every train.average_every steps."""

    name: Literal["sgd"] = "sgd"
    lr: PositiveFloat = 0.7
    momentum: Fraction = 0.9
    nesterov: bool = True

    def __post_init__(self) -> None:
        what, nesterov = "false when momentum = 0", self.nesterov
        _require(not nesterov or self.momentum > 0, "outer.nesterov", what, nesterov)


@_section("fault")
class FaultSection:
    """Fault injection for tests and drills; each fault fires once per run directory."""

    kill_worker_at_step: PositiveInt | None = None
    """Kill the worker process of `rank` when it reaches this optimizer step."""
    nan_at_step: PositiveInt | None = None
    """Make the loss of `rank` non-finite at this optimizer step."""
    rank: NonNegativeInt = 0
    """The worker the faults hit."""


@_section("", title="raymb config")
class Config:
    """A raymb run: one table per section; every key is optional."""

    run: RunSection = field(default_factory=RunSection)
    storage: StorageSection = field(default_factory=StorageSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    scale: ScaleSection = field(default_factory=ScaleSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    outer: OuterSection = field(default_factory=OuterSection)
    fault: FaultSection = field(default_factory=FaultSection)

    def __post_init__(self) -> None:
        G, m, W = self.train.global_batch_size, self.train.microbatch_size, self.scale.max_workers
        low = self.scale.min_workers
        _require(self.fault.rank < low, "fault.rank", f"< scale.workers={low}", self.fault.rank)
        if G == "all" or m == "auto" or self.scale.elastic:
            return  # elastic: a W that does not divide G splits steps unevenly (raymb.core.plan)
        if m is None:
            if G % W:
                raise ConfigError(
                    f"train.global_batch_size={G} is not divisible by scale.workers={W}"
                )
        elif G % (W * m):
            valid = [d for d in range(1, G // W + 1) if G % (W * d) == 0]
            raise ConfigError(
                f"train.global_batch_size={G} is not divisible by scale.workers={W} x "
                f"train.microbatch_size={m}; valid microbatch sizes: "
                + (", ".join(map(str, valid)) if valid else f"none (G is not a multiple of W={W})")
            )

    def microbatch(self) -> int | None:
        """m, resolved: G / W when unset (G / max W, rounded up, for elastic workers); None
        where it depends on the data or the memory (full batch without m, "auto")."""
        G, m = self.train.global_batch_size, self.train.microbatch_size
        if m == "auto":
            return None
        if m is not None:
            return m
        return None if G == "all" else -(-G // self.scale.max_workers)

    def accumulation_steps(self) -> int | None:
        """k = G / (W·m); None for full batch, an automatic m or elastic workers, where it
        depends on the data or the cluster."""
        G, m = self.train.global_batch_size, self.microbatch()
        if G == "all" or m is None or self.scale.elastic:
            return None
        return G // (self.scale.max_workers * m)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """Build and check a Config from nested dicts (TOML tables)."""
        data = raw.get("data")
        if isinstance(data, dict):
            if isinstance(data.get("train"), str):
                data = _with_manifest(data)
            if "train" in data and "val" not in data:
                data = {**data, "val": None}  # never validate a user's model on the demo set
            raw = {**raw, "data": data}
        config = _build(cls, raw, "")
        if config.data.val is None and "metric" not in raw.get("checkpoint", {}):
            # The default, val_loss, would refuse to train: fall back to what there is.
            checkpoint = dataclasses.replace(config.checkpoint, metric="train_loss")
            config = dataclasses.replace(config, checkpoint=checkpoint)
        return config


def _with_manifest(table: dict[str, Any]) -> dict[str, Any]:
    """The [data] keys a prepared folder's manifest gives, under the ones the config sets."""
    from raymb.data.manifest import data_defaults, find_manifest
    from raymb.errors import DataError

    try:
        found = find_manifest(table["train"])
    except DataError as e:
        raise ConfigError(f"data.train: {e}") from None
    if found is None:
        return table
    folder, manifest = found
    defaults = data_defaults(manifest)
    val = folder / "val"
    train = Path(table["train"]).expanduser().resolve()
    if train == (folder / "train").resolve() and val.is_dir():
        defaults["val"] = str(val)  # the folder's own validation split
    return {**defaults, **table}


# ---------------------------------------------------------------- one-line errors


def _build(cls: type, table: Any, where: str) -> Any:
    """A section from its TOML table (`where` its dotted name), its own tables first."""
    if not isinstance(table, dict):
        name = where if "." in where else f"[{where}]"
        raise ConfigError(f"{name} must be a table of keys (got {table!r})")
    fields = cls.__pydantic_fields__
    values = {}
    for key, value in table.items():
        tp = fields[key].annotation if key in fields else None
        if dataclasses.is_dataclass(tp):
            value = _build(tp, value, f"{where}.{key}".lstrip("."))
        elif value in ("", "none") and type(None) in typing.get_args(tp):
            value = None  # TOML has no null: an optional key is unset with "" or none
        values[key] = value
    return cls(**values)


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _error(cls: type, where: str, values: dict[str, Any], error: Any) -> ConfigError:
    """The first error pydantic found, in one line that names the key and the value."""
    key = error["loc"][0]
    fields = cls.__pydantic_fields__
    if error["type"] == "unexpected_keyword_argument":
        key = key if str(key).isprintable() else repr(key)  # a key read from TOML: one line
        if not where:
            return ConfigError(f"unknown config section [{key}]; known: {', '.join(fields)}")
        return ConfigError(
            f"unknown config key {where}.{key}; known in [{where}]: {', '.join(fields)}"
        )
    f = fields[key]
    bound = error["type"].startswith(("greater_than", "less_than"))
    ((side, limit),) = error["ctx"].items() if bound else [(None, None)]
    if error["type"] == "finite_number":
        what = _finite(f)
    elif bound and limit in _LIMITS:  # name the limit of torch or the step counter crossed
        what = f"{_BOUNDS[side]} {limit}"
    elif bound:
        what = _bounds(f)
    else:
        what = _describe(f.annotation)
    return ConfigError(f"{where}.{key} must be {what} (got {values[key]!r})".lstrip("."))


def _finite(f: Any) -> str:
    """What a float field that got inf or nan takes: 'a finite number > 0', ..."""
    if typing.get_origin(_unwrap(f.annotation)) is list:
        return "a list of finite numbers"
    bounds = _bounds(f)
    return f"a finite number {bounds}" if bounds else "a finite number"


def _unwrap(tp: Any) -> Any:
    """The type of an optional field, without None."""
    args = [t for t in typing.get_args(tp) if t is not type(None)]
    optional = typing.get_origin(tp) in (Union, types.UnionType)
    return args[0] if optional and len(args) == 1 else tp


def _bounds(f: Any) -> str:
    """A field's bounds in words: '> 0', 'in [0, 1)'; '' for none. A limit of what torch and
    the step counter take is left out (it is named only when a value crosses it)."""
    meta = [*f.metadata]
    for tp in typing.get_args(f.annotation):  # an optional field: Annotated inside the union
        meta += getattr(tp, "__metadata__", ())
    found = {
        k: getattr(m, k)
        for m in meta
        for k in _BOUNDS
        if getattr(m, k, None) is not None and getattr(m, k) not in _LIMITS
    }
    if not found:
        return ""
    if len(found) == 1:
        ((k, v),) = found.items()
        return f"{_BOUNDS[k]} {v}"
    lo = f"[{found['ge']}" if "ge" in found else f"({found['gt']}"
    hi = f"{found['le']}]" if "le" in found else f"{found['lt']})"
    return f"in {lo}, {hi}"


def _describe(tp: Any) -> str:
    """A field's type in words, for the 'must be' of an error."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return "a table of keys"
    if origin is Annotated:
        return _describe(args[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}[args[0]]
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(t) for t in args if t is not type(None))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def _require(ok: bool, key: str, what: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {what} (got {got!r})")


# ---------------------------------------------------------------- reading and writing


def parse_override(item: str) -> tuple[list[str], Any]:
    """'section.key=value' -> (['section', 'key'], value), the value read as TOML if it parses."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, text = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) not in (2, 3) or not all(path):
        raise ConfigError(f"--set {item!r}: the key must be section.key, e.g. train.epochs")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word such as all or mlp
    return path, value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML config (or the defaults when path is None) and apply --set overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_toml(path)
    for item in overrides:
        path, value = parse_override(item)
        table = raw
        for part in path[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a table")
        table[path[-1]] = value
    return Config.from_dict(raw)


def _read_toml(path: str | Path) -> dict[str, Any]:
    """A config file's tables; a file that is missing, unreadable, not UTF-8 or not TOML is a
    one-line ConfigError naming it."""
    try:
        text = Path(path).read_bytes().decode("utf-8")  # TOML is UTF-8, whatever the locale
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, not a TOML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {e.start}: {e.object[e.start]:#04x}); "
            "save it as UTF-8"
        ) from None
    except (OSError, ValueError) as e:  # permission, a NUL in the path, ...
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"config file {path} cannot be read: {reason}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def to_toml(config: Config) -> str:
    """The resolved config as TOML; unset keys appear commented out."""
    lines: list[str] = []
    notes = _notes(config)
    for section, table in config.to_dict().items():
        _toml_table(section, table, notes, lines)
    return "\n".join(lines)


def _notes(config: Config) -> dict[str, str]:
    """Where a value gives up a promise, or was chosen for the user, --print-config says so."""
    notes = {}
    if config.model.norm == "batch":
        notes["model.norm"] = (
            "BatchNorm's statistics depend on how a step is cut into microbatches: the "
            'equivalence contract holds with norm = "group", not with batch'
        )
    if config.data.val is None and config.checkpoint.metric == "train_loss":
        notes["checkpoint.metric"] = "no data.val: the default val_loss needs a validation set"
    return notes


def _toml_table(name: str, table: dict[str, Any], notes: dict[str, str], lines: list[str]) -> None:
    lines.append(f"[{name}]")
    nested = {k: v for k, v in table.items() if isinstance(v, dict)}
    for key, value in table.items():
        if key in nested:
            continue
        try:
            line = f"# {key} = (unset)" if value is None else f"{key} = {_toml_value(value)}"
        except ValueError as e:
            raise ConfigError(f"{name}.{key}={value!r} cannot be written as TOML: {e}") from None
        note = notes.get(f"{name}.{key}")
        lines.append(line if note is None else f"{line}  # {note}")
    lines.append("")
    for key, value in nested.items():
        _toml_table(f"{name}.{key}", value, notes, lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


_TOML_ESCAPES = {
    "\\": "\\\\",
    '"': '\\"',
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_char(c: str) -> str:
    """One character of a TOML basic string: control, format and line-separator characters
    escaped, so a value with a newline stays on its line and reads back the same."""
    if c in _TOML_ESCAPES:
        return _TOML_ESCAPES[c]
    if 0xD800 <= ord(c) < 0xE000:  # a byte that was not UTF-8 (surrogateescape): no TOML
        raise ValueError("not UTF-8 text")
    if c.isprintable():
        return c
    return f"\\u{ord(c):04X}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08X}"


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


# ---------------------------------------------------------------- JSON Schema


class _TomlSchema(GenerateJsonSchema):
    """pydantic's JSON Schema, for TOML: there is no null (an optional key is left out, or
    unset with "" or "none"), and the lists' defaults are written out."""

    def nullable_schema(self, schema: Any) -> dict[str, Any]:
        inner = self.generate_inner(schema["schema"])
        return self.get_union_of_schemas([inner, {"enum": ["", "none"]}])

    def get_default_value(self, schema: Any) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not dataclasses.is_dataclass(factory):
            return factory()
        default = super().get_default_value(schema)
        return NoDefault if default is None else default


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a config file: editors check a TOML file whose first line is
    `#:schema ./raymb.schema.json` against it (unknown keys, types, bounds)."""
    schema = TypeAdapter(Config).json_schema(schema_generator=_TomlSchema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
