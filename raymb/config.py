"""The run configuration: one frozen dataclass per TOML section, checked as it is built.

Every user mistake in a config file or a `--set` override surfaces here as a one-line
`ConfigError` naming the key, before Ray starts.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from raymb.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_FROZEN = dict(frozen=True, kw_only=True)


@dataclass(**_FROZEN)
class RunSection:
    name: str = "default"
    """Run directory name under storage_path; starting a run whose name exists resumes it."""
    storage_path: str = "runs"
    """Where run directories live: a local path (shared between nodes on a cluster)."""

    def __post_init__(self) -> None:
        _require(
            bool(self.name) and "/" not in self.name, "run.name", "a non-empty name without '/'"
        )
        # metrics.csv and summary.json are written with local file I/O for now.
        _require(
            "://" not in self.storage_path,
            "run.storage_path",
            "a local or mounted path (object-store URIs are not supported yet)",
        )


@dataclass(**_FROZEN)
class DataSection:
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
    scale: float | None = None
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
        _require(self.features != [], "data.features", "a column name or a non-empty list of names")
        _require(self.scale is None or self.scale > 0, "data.scale", "> 0")
        _require(
            (self.mean is None) == (self.std is None),
            "data.mean",
            "set together with data.std (one value per channel each)",
        )
        if self.mean is not None:
            _require(
                len(self.mean) == len(self.std) and len(self.mean) > 0,
                "data.std",
                f"as many values as data.mean ({len(self.mean)})",
            )
            _require(all(s > 0 for s in self.std), "data.std", "positive values")
        _require(
            self.task != "lm" or isinstance(self.features, str),
            "data.features",
            'one column of token blocks when data.task = "lm"',
        )


@dataclass(**_FROZEN)
class ModelSection:
    name: str = "linear"
    """linear, mlp, cnn, gpt, or package.module:factory (called as factory(in_features,
    out_features) for flat features, factory(input_shape, out_features) for tensor columns;
    out_features is the vocabulary size for data.task = "lm")."""
    hidden: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layer widths of the mlp."""
    num_classes: int | None = None
    """Classes of a classifier; unset: max label + 1."""
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    """cnn: channels of each residual stage (each stage after the first halves the image)."""
    norm: Literal["batch", "group"] = "batch"
    """cnn: BatchNorm (statistics depend on how a step is cut into microbatches: the
    equivalence contract does not hold) or GroupNorm (exact)."""
    depth: int = 4
    """gpt: transformer blocks."""
    width: int = 128
    """gpt: embedding width (a multiple of model.heads)."""
    heads: int = 4
    """gpt: attention heads."""
    block_size: int | None = None
    """gpt: longest context (positions); unset: the data's block (tokens per row - 1)."""
    dropout: float = 0.0
    """gpt: dropout rate (0 keeps the equivalence contract exact)."""

    def __post_init__(self) -> None:
        builtin = self.name in BUILTIN_MODELS
        _require(
            builtin or ":" in self.name,
            "model.name",
            ", ".join(BUILTIN_MODELS) + " or package.module:factory",
        )
        _require(all(h > 0 for h in self.hidden), "model.hidden", "positive layer widths")
        _require(self.num_classes is None or self.num_classes >= 2, "model.num_classes", ">= 2")
        _require(
            bool(self.widths) and all(w > 0 for w in self.widths),
            "model.widths",
            "a non-empty list of positive channel counts",
        )
        _require(self.depth > 0, "model.depth", "> 0")
        _require(self.heads > 0, "model.heads", "> 0")
        _require(
            self.width > 0 and self.width % self.heads == 0,
            "model.width",
            f"a positive multiple of model.heads={self.heads}",
        )
        _require(self.block_size is None or self.block_size > 0, "model.block_size", "> 0")
        _require(0 <= self.dropout < 1, "model.dropout", "in [0, 1)")


BUILTIN_MODELS = ("linear", "mlp", "cnn", "gpt")


@dataclass(**_FROZEN)
class OptimSection:
    name: Literal["sgd", "adagrad", "adam", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    """SGD momentum (ignored by the other optimizers)."""
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam and AdamW betas."""
    schedule: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = 0
    """Linear warm-up from 0 to lr over this many optimizer steps."""
    step_size: int = 100
    """step schedule: multiply lr by gamma every step_size optimizer steps."""
    gamma: float = 0.1
    min_lr: float = 0.0
    """cosine schedule: lr at the last step."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; unset for no clipping."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", "> 0")
        _require(0 <= self.momentum < 1, "optim.momentum", "in [0, 1)")
        _require(self.weight_decay >= 0, "optim.weight_decay", ">= 0")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            "two values in [0, 1)",
        )
        _require(self.warmup_steps >= 0, "optim.warmup_steps", ">= 0")
        _require(self.step_size > 0, "optim.step_size", "> 0")
        _require(0 < self.gamma <= 1, "optim.gamma", "in (0, 1]")
        _require(0 <= self.min_lr <= self.lr, "optim.min_lr", "in [0, optim.lr]")
        _require(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", "> 0")


@dataclass(**_FROZEN)
class EarlyStopping:
    patience: int | None = None
    """Stop after this many validations without improving checkpoint.metric; unset: never."""
    min_delta: float = 0.0
    """An improvement smaller than this does not count."""

    def __post_init__(self) -> None:
        _require(self.patience is None or self.patience > 0, "train.early_stopping.patience", "> 0")
        _require(self.min_delta >= 0, "train.early_stopping.min_delta", ">= 0")


@dataclass(**_FROZEN)
class TrainSection:
    global_batch_size: Union[int, Literal["all"]] = 64
    """G: samples per optimizer step across all workers; "all" is full-batch gradient descent."""
    microbatch_size: Union[int, Literal["auto"], None] = None
    """m: samples per forward/backward on one worker; unset: G / workers (no accumulation);
    "auto": the largest that keeps k whole and whose estimated activations (a probe forward
    of the model) fit train.memory_budget."""
    memory_budget: str = "1GiB"
    """Activation memory a microbatch may use when microbatch_size = "auto" (e.g. 512MiB)."""
    epochs: int = 5
    max_steps: int | None = None
    """Stop after this many optimizer steps in total (counting steps of earlier attempts)."""
    seed: int = 0
    sync: Literal["grad", "param", "diloco"] = "grad"
    """grad: DDP gradient all-reduce every step; param: local SGD, parameters averaged every
    average_every steps; diloco: local inner steps, then an outer step on the averaged
    pseudo-gradient (see [outer])."""
    average_every: int = 8
    """H: local steps between two averagings (param, diloco)."""
    local_sgd_warmup: int = 0
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
    log_every: int = 10
    """A row of metrics.csv every this many steps (rows are gathered and written about once a
    second, so 1 costs little)."""

    def __post_init__(self) -> None:
        G = self.global_batch_size
        _require(G == "all" or G > 0, "train.global_batch_size", 'a positive integer or "all"')
        m = self.microbatch_size
        _require(m is None or m == "auto" or m > 0, "train.microbatch_size", '> 0 or "auto"')
        _require(
            parse_bytes(self.memory_budget) is not None,
            "train.memory_budget",
            'a size such as "512MiB" or "2GiB"',
        )
        if isinstance(m, int) and G != "all" and m > G:
            raise ConfigError(
                f"train.microbatch_size={m} is larger than train.global_batch_size={G}"
            )
        _require(
            G != "all" or m is not None,
            "train.microbatch_size",
            'set (a number or "auto") when train.global_batch_size = "all"',
        )
        _require(self.epochs > 0, "train.epochs", "> 0")
        _require(self.max_steps is None or self.max_steps > 0, "train.max_steps", "> 0")
        _require(self.log_every > 0, "train.log_every", "> 0")
        _require(self.average_every > 0, "train.average_every", "> 0")
        _require(self.local_sgd_warmup >= 0, "train.local_sgd_warmup", ">= 0")

    def memory_budget_bytes(self) -> int:
        return parse_bytes(self.memory_budget)


@dataclass(**_FROZEN)
class ScaleSection:
    workers: Union[int, list[int]] = 2
    """Training workers; [min, max]: elastic (Ray Train starts with as many as the cluster
    has room for, at least min, and restarts from the latest checkpoint at a new size when
    nodes come or go; the steps' rows do not depend on the number, so under grad sync the
    numbers do not either)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL; otherwise CPU workers with gloo."""
    max_failures: int = 0
    """Worker-group restarts from the last checkpoint before the run fails."""
    cpus_per_worker: float | None = None
    """Logical CPUs per worker; unset: chosen so Ray Data keeps a CPU to read with."""

    def __post_init__(self) -> None:
        if isinstance(self.workers, list):
            _require(
                len(self.workers) == 2 and 0 < self.workers[0] <= self.workers[1],
                "scale.workers",
                f"a number > 0 or [min, max] with 0 < min <= max, got {self.workers!r}",
            )
        _require(self.max_workers > 0, "scale.workers", "> 0")
        _require(self.max_failures >= 0, "scale.max_failures", ">= 0")
        _require(
            self.cpus_per_worker is None or self.cpus_per_worker > 0, "scale.cpus_per_worker", "> 0"
        )

    @property
    def elastic(self) -> bool:
        return isinstance(self.workers, list) and self.workers[0] < self.workers[1]

    @property
    def min_workers(self) -> int:
        return self.workers[0] if isinstance(self.workers, list) else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers[1] if isinstance(self.workers, list) else self.workers


@dataclass(**_FROZEN)
class CheckpointSection:
    every_steps: int | None = None
    """Also checkpoint every this many optimizer steps (always: each epoch's end, and the end)."""
    keep: int = 2
    """Checkpoints kept: the best by `metric`; the latest is always kept too."""
    metric: Literal["val_loss", "train_loss", "val_accuracy"] = "val_loss"
    min_interval_s: float = 10.0
    """Skip an epoch-end checkpoint (and its validation) that comes sooner than this after the
    last checkpoint, under train.sync = "grad" (where skipping changes no number); every_steps
    and the last step always checkpoint. 0: every epoch's end."""

    def __post_init__(self) -> None:
        _require(self.every_steps is None or self.every_steps > 0, "checkpoint.every_steps", "> 0")
        _require(self.min_interval_s >= 0, "checkpoint.min_interval_s", ">= 0")
        _require(self.keep > 0, "checkpoint.keep", "> 0")

    @property
    def mode(self) -> str:
        return "max" if self.metric == "val_accuracy" else "min"


@dataclass(**_FROZEN)
class OuterSection:
    """DiLoCo's outer optimizer, stepping the global parameters on the averaged
    pseudo-gradient (theta_global - theta_local) every train.average_every steps."""

    name: Literal["sgd"] = "sgd"
    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True

    def __post_init__(self) -> None:
        _require(self.lr > 0, "outer.lr", "> 0")
        _require(0 <= self.momentum < 1, "outer.momentum", "in [0, 1)")
        _require(
            not self.nesterov or self.momentum > 0, "outer.nesterov", "false when momentum = 0"
        )


@dataclass(**_FROZEN)
class FaultSection:
    """Fault injection for tests and drills; each fault fires once per run directory."""

    kill_worker_at_step: int | None = None
    """Kill the worker process of `rank` when it reaches this optimizer step."""
    nan_at_step: int | None = None
    """Make the loss of `rank` non-finite at this optimizer step."""
    rank: int = 0
    """The worker the faults hit."""

    def __post_init__(self) -> None:
        for key in ("kill_worker_at_step", "nan_at_step"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"fault.{key}", "> 0")
        _require(self.rank >= 0, "fault.rank", ">= 0")


@dataclass(**_FROZEN)
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    scale: ScaleSection = field(default_factory=ScaleSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    outer: OuterSection = field(default_factory=OuterSection)
    fault: FaultSection = field(default_factory=FaultSection)

    def __post_init__(self) -> None:
        G, m, W = self.train.global_batch_size, self.train.microbatch_size, self.scale.max_workers
        low = self.scale.min_workers
        _require(self.fault.rank < low, "fault.rank", f"< scale.workers={low}")
        if G == "all" or m == "auto" or self.scale.elastic:
            return  # elastic: a W that does not divide G splits steps unevenly (raymb.plan)
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
        hints = typing.get_type_hints(cls)
        sections = {}
        for name, table in raw.items():
            if name not in hints:
                raise ConfigError(f"unknown config section [{name}]; known: {', '.join(hints)}")
            if not isinstance(table, dict):
                raise ConfigError(f"[{name}] must be a table of keys, got {table!r}")
            if name == "data" and isinstance(table.get("train"), str):
                table = _with_manifest(table)
            if name == "data" and "train" in table and "val" not in table:
                table = {**table, "val": None}  # never validate a user's model on the demo set
            sections[name] = _build_section(name, hints[name], table)
        try:
            return cls(**sections)
        except TypeError as e:  # pragma: no cover - guarded by _build_section
            raise ConfigError(str(e)) from None


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


def _build_section(section: str, cls: type, table: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in table.items():
        if key not in hints:
            raise ConfigError(
                f"unknown config key {section}.{key}; known in [{section}]: {', '.join(hints)}"
            )
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{section}.{key} must be a table of keys, got {value!r}")
            values[key] = _build_section(f"{section}.{key}", hints[key], value)
        else:
            values[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**values)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return value if it has type tp (an int is accepted as a float); else raise."""
    if value in ("", "none") and _matches(None, tp):
        return None  # TOML has no null: an optional key is unset with "" or none
    if _matches(value, tp):
        if _is_float(tp) and type(value) is int:
            return float(value)
        return value
    raise ConfigError(f"{key} must be {_describe(tp)}, got {value!r}")


def _is_float(tp: Any) -> bool:
    return tp is float or (_is_union(tp) and float in typing.get_args(tp))


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if _is_union(tp):
        return any(_matches(value, t) for t in typing.get_args(tp))
    raise TypeError(f"unsupported config type {tp}")  # pragma: no cover


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "unset"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        plural = {int: "integers", float: "numbers", str: "strings"}.get(item)
        return f"a list of {plural or _describe(item)}"
    if _is_union(tp):
        return " or ".join(_describe(t) for t in typing.get_args(tp) if t is not type(None))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def _require(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {what}")


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
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for item in overrides:
        path, value = parse_override(item)
        table = raw
        for part in path[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a table")
        table[path[-1]] = value
    return Config.from_dict(raw)


def to_toml(config: Config) -> str:
    """The resolved config as TOML; unset keys appear commented out."""
    lines: list[str] = []
    for section, table in config.to_dict().items():
        _toml_table(section, table, lines)
    return "\n".join(lines)


# Where a value gives up a promise, --print-config says so next to it.
_NOTES = {
    ("model", "norm", '"batch"'): "BatchNorm's statistics depend on how a step is cut into "
    'microbatches: the equivalence contract holds with norm = "group", not with batch',
}


def _toml_table(name: str, table: dict[str, Any], lines: list[str]) -> None:
    lines.append(f"[{name}]")
    nested = {k: v for k, v in table.items() if isinstance(v, dict)}
    for key, value in table.items():
        if key in nested:
            continue
        line = f"# {key} = (unset)" if value is None else f"{key} = {_toml_value(value)}"
        note = _NOTES.get((name, key, _toml_value(value)))
        lines.append(line if note is None else f"{line}  # {note}")
    lines.append("")
    for key, value in nested.items():
        _toml_table(f"{name}.{key}", value, lines)


_UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_bytes(text: str) -> int | None:
    """'512MiB' -> 536870912; None when the text is not a size."""
    number = text.strip().lower().rstrip("bikmg")
    unit = text.strip().lower()[len(number) :] or "b"
    try:
        value = float(number)
    except ValueError:
        return None
    return int(value * _UNITS[unit]) if unit in _UNITS and value > 0 else None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
