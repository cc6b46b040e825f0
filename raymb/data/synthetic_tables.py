"""The tabular kinds of `raymb gen-data` (through raymb.data.synthetic.generate): linear,
regression and classification, seeded parquet datasets with a known answer.

Each dataset is `out_dir/train/part-NNNNN.parquet`, optionally `out_dir/val/...`, and
`out_dir/truth.json` holding the parameters that generated it, so a test or a user can
check what training recovers. Columns: `features` (fixed_size_list<float32>[d]) and
`label` (float32 for regression kinds, int64 for classification). `out_dir` must be new or
empty; the set is written into a temporary sibling and renamed into place, as `raymb
prepare` writes, so an existing dataset is never overwritten and a failed run leaves nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raymb.data.folder import check_new_folder, new_folder
from raymb.errors import ConfigError

KINDS = ("linear", "regression", "classification")
DEFAULT_FEATURES = {"linear": 1, "regression": 8, "classification": 16}
REGRESSION_BIAS = 0.5
FEATURES_COLUMN = "features"
LABEL_COLUMN = "label"
# Bounds checked before anything is allocated: the whole set is made in memory at once.
MAX_ROWS = 10_000_000
MAX_FEATURES = 100_000
MAX_SHARDS = 10_000
MAX_CLASSES = 100_000  # raymb.data.checks's (not imported: it imports torch): trains as it is
# rows x (features + outputs), val included: each value takes about 16 bytes on the way
# (float32 features, their float64 product, the float64 signal and its noise): ~2 GiB.
MAX_VALUES = 2**27


def generate(
    kind: str,
    out_dir: str | Path,
    *,
    rows: int = 4096,
    shards: int = 4,
    features: int | None = None,
    classes: int = 3,
    noise: float = 0.1,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> dict:
    """Write a seeded dataset of `kind` under `out_dir` and return its truth.json content.

    `rows` training rows go into `shards` files; round(rows * val_fraction) further rows
    (at least one when val_fraction > 0) go into max(1, shards // 2) validation files.
    """
    _validate(kind, rows, shards, features, classes, noise, seed, val_fraction)
    d = features if features is not None else DEFAULT_FEATURES[kind]
    val_rows = max(1, round(rows * val_fraction)) if val_fraction > 0 else 0
    val_shards = min(max(1, shards // 2), val_rows)
    values = (rows + val_rows) * (d + (classes if kind == "classification" else 1))
    if values > MAX_VALUES:
        raise ConfigError(
            f"gen-data: --rows x (--features + outputs) is {values} values, validation rows "
            f"included; at most {MAX_VALUES} (about 2 GiB of memory): fewer rows or features"
        )
    check_new_folder(out_dir)  # before the work: an existing dataset is left alone

    # Independent streams per role: the true parameters depend only on (seed, d, classes),
    # not on rows, so datasets of different sizes from one seed share one teacher.
    param_rng, x_rng, noise_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)
    )
    n = rows + val_rows
    if kind == "linear":
        weight = np.array([[2.0]], dtype=np.float32)
        bias = np.array([1.0], dtype=np.float32)
        # Uniform(-1, 1) keeps the seed documents' example well conditioned.
        x = x_rng.uniform(-1.0, 1.0, size=(n, d)).astype(np.float32)
    else:
        out = 1 if kind == "regression" else classes
        weight = param_rng.standard_normal((out, d), dtype=np.float32)
        bias = np.full(out, REGRESSION_BIAS if kind == "regression" else 0.0, np.float32)
        x = x_rng.standard_normal((n, d), dtype=np.float32)

    # Layout follows torch.nn.Linear: weight is (out, in), so the target is x @ weight.T.
    signal = x.astype(np.float64) @ weight.T.astype(np.float64) + bias
    signal += noise * noise_rng.standard_normal(signal.shape)
    if kind == "classification":
        y = np.argmax(signal, axis=1).astype(np.int64)
    else:
        y = signal[:, 0].astype(np.float32)

    truth = {
        "kind": kind,
        # int()/float(): numpy scalars pass validation but json cannot write them.
        "seed": int(seed),
        "rows": int(rows),
        "val_rows": int(val_rows),
        "shards": int(shards),
        "val_shards": int(val_shards),
        "features": int(d),
        "noise": float(noise),
        "columns": {"features": FEATURES_COLUMN, "label": LABEL_COLUMN},
        "weight": weight.tolist(),
        "bias": bias.tolist(),
    }
    if kind == "classification":
        truth["classes"] = int(classes)

    with new_folder(out_dir) as tmp:
        _write_split(tmp / "train", x[:rows], y[:rows], shards)
        if val_rows:
            _write_split(tmp / "val", x[rows:], y[rows:], val_shards)
        (tmp / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    return truth


def _validate(
    kind: str,
    rows: int,
    shards: int,
    features: int | None,
    classes: int,
    noise: float,
    seed: int,
    val_fraction: float,
) -> None:
    def fail(msg: str) -> None:
        raise ConfigError(f"gen-data: {msg}")

    def is_int(v: object) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if kind not in KINDS:
        fail(f"unknown kind {kind!r} (choose one of {', '.join(KINDS)})")
    if not is_int(rows) or not 1 <= rows <= MAX_ROWS:
        fail(f"--rows must be an integer from 1 to {MAX_ROWS} (got {rows!r})")
    if not is_int(shards) or not 1 <= shards <= min(rows, MAX_SHARDS):
        fail(
            f"--shards must be between 1 and --rows, at most {MAX_SHARDS} "
            f"(got {shards!r}, --rows {rows})"
        )
    if features is not None and (not is_int(features) or not 1 <= features <= MAX_FEATURES):
        fail(f"--features must be an integer from 1 to {MAX_FEATURES} (got {features!r})")
    if kind == "linear" and features not in (None, 1):
        fail(f"--features must be 1 for kind 'linear' (y = 2x + 1), got {features}")
    if kind == "classification" and (not is_int(classes) or not 2 <= classes <= MAX_CLASSES):
        fail(f"--classes must be an integer from 2 to {MAX_CLASSES} (got {classes!r})")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        fail(f"--noise must be a number >= 0 (got {noise!r})")
    if not math.isfinite(noise):
        fail(f"--noise must be finite (got {noise!r})")
    if not is_int(seed) or seed < 0:
        fail(f"--seed must be an integer >= 0 (got {seed!r})")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        fail(f"--val-fraction must be a number in [0, 1) (got {val_fraction!r})")
    if not 0 <= val_fraction < 1:
        fail(f"--val-fraction must be in [0, 1) (got {val_fraction!r})")


def _write_split(split_dir: Path, x: np.ndarray, y: np.ndarray, shards: int) -> None:
    """Write `shards` parquet files whose sizes differ by at most one row."""
    split_dir.mkdir(parents=True, exist_ok=True)
    base, extra = divmod(len(y), shards)
    lo = 0
    for i in range(shards):
        hi = lo + base + (1 if i < extra else 0)
        pq.write_table(_table(x[lo:hi], y[lo:hi]), split_dir / f"part-{i:05d}.parquet")
        lo = hi


def _table(x: np.ndarray, y: np.ndarray) -> pa.Table:
    d = x.shape[1]
    flat = pa.array(np.ascontiguousarray(x, dtype=np.float32).reshape(-1))
    return pa.table(
        {
            FEATURES_COLUMN: pa.FixedSizeListArray.from_arrays(flat, d),
            LABEL_COLUMN: pa.array(y),
        }
    )
