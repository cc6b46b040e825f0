"""Bad input stops `raymb train` at the door: one line naming what to fix, exit 2, nothing written.

Every case runs the real CLI in a subprocess, in a directory of its own, and compares that
directory before and after: no run directory, checkpoint, metrics.csv or summary.json, and
no other file either. None of them gets as far as starting Ray, so the subprocesses are all
started at once (a few seconds each, mostly importing torch and ray) and each test waits for
its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymb.load import load_config
from raymb.rundir.checkpoint import claim_run

ROOT = Path(__file__).resolve().parents[3]
ROWS = 8  # rows of every generated dataset: 4 per worker with the default 2 workers
NAN, INF = float("nan"), float("inf")


def _write(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _good(n: int = ROWS) -> dict[str, pa.Array]:
    x = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(2 * n, dtype=np.float32)), 2)
    return {"features": x, "label": pa.array(np.zeros(n, dtype=np.float32))}


def _with_nonfinite(values: np.ndarray, rows: list[int]) -> np.ndarray:
    values = values.astype(np.float32).copy()
    for i, r in enumerate(rows):
        values[r] = (NAN, INF, -INF)[i % 3]
    return values


# --- each case writes its input under `d` and returns the CLI arguments it adds ------------
# The defaults point data.train at d/data and run.storage_path at d/runs.


def _missing_path(d: Path) -> list[str]:
    return [f"--set=data.train={d / 'nope'}"]


def _empty_dir(d: Path) -> list[str]:
    (d / "data").mkdir()
    return []


def _zero_rows(d: Path) -> list[str]:
    _write(d / "data" / "a.parquet", pa.table(_good(0)))
    return []


def _notes_txt(d: Path) -> list[str]:
    _write(d / "data" / "a.parquet", pa.table(_good()))
    (d / "data" / "notes.txt").write_text("collected on Monday\n")
    return []


def _corrupt_parquet(d: Path) -> list[str]:
    _write(d / "data" / "a.parquet", pa.table(_good()))
    (d / "data" / "b.parquet").write_bytes(b"PAR1 but not really")
    return []


def _missing_column(d: Path) -> list[str]:
    _write(d / "data" / "a.parquet", pa.table({"features": _good()["features"]}))
    return []


def _misnamed_column(d: Path) -> list[str]:
    _write(d / "data" / "a.parquet", pa.table(_good()))
    return ["--set=data.features=feats"]


def _wrong_dtype(d: Path) -> list[str]:
    _write(d / "data" / "a.parquet", pa.table({**_good(), "label": pa.array(["x"] * ROWS)}))
    return []


def _ragged(d: Path) -> list[str]:
    feats = pa.array([[1.0, 2.0], [1.0, 2.0, 3.0]] * (ROWS // 2), type=pa.list_(pa.float32()))
    _write(d / "data" / "a.parquet", pa.table({"features": feats, "label": _good()["label"]}))
    return []


def _inf_labels(d: Path) -> list[str]:
    _write(d / "data" / "a.parquet", pa.table(_good()))
    labels = pa.array(_with_nonfinite(np.zeros(ROWS), [2, 5]))
    _write(d / "data" / "b.parquet", pa.table({**_good(), "label": labels}))
    return []


def _nan_in_val(d: Path) -> list[str]:
    _write(d / "data" / "a.parquet", pa.table(_good()))
    labels = pa.array(_with_nonfinite(np.zeros(ROWS), [7]))
    _write(d / "val" / "v.parquet", pa.table({**_good(), "label": labels}))
    return [f"--set=data.val={d / 'val'}"]


def _more_workers_than_rows(d: Path) -> list[str]:
    _write(d / "data" / "a.parquet", pa.table(_good()))
    return ["--set=scale.workers=16"]


def _microbatch_larger_than_shard(d: Path) -> list[str]:
    _write(d / "data" / "a.parquet", pa.table(_good()))  # 2 workers x 4 rows
    return ["--set=train.global_batch_size=16", "--set=train.microbatch_size=8"]


def _full_batch_microbatch_larger_than_shard(d: Path) -> list[str]:
    _write(d / "data" / "a.parquet", pa.table(_good()))
    return ["--set=train.global_batch_size=all", "--set=train.microbatch_size=8"]


def _config_type_error(d: Path) -> list[str]:
    _write(d / "data" / "a.parquet", pa.table(_good()))
    return ["--set=train.epochs=many"]


def _config_file_type_error(d: Path) -> list[str]:
    _write(d / "data" / "a.parquet", pa.table(_good()))
    (d / "bad.toml").write_text('[scale]\nworkers = "two"\n')
    return ["--config", str(d / "bad.toml")]


def _unknown_model(d: Path) -> list[str]:
    _write(d / "data" / "a.parquet", pa.table(_good()))
    return ["--set=model.name=resnet"]


def _unimportable_model(d: Path) -> list[str]:
    _write(d / "data" / "a.parquet", pa.table(_good()))
    return ["--set=model.name=no_such_package.models:build"]


def _missing_model_factory(d: Path) -> list[str]:
    _write(d / "data" / "a.parquet", pa.table(_good()))
    return ["--set=model.name=raymb.models:no_such_factory"]


def _set_without_equals(d: Path) -> list[str]:
    _write(d / "data" / "a.parquet", pa.table(_good()))
    return ["--set", "train.epochs"]


# A run that would train in a blink if it were not refused: one worker, one step.
_SMALL_RUN = [
    "run.name=r",
    "scale.workers=1",
    "train.global_batch_size=4",
    "train.epochs=1",
    "train.max_steps=1",
    "checkpoint.metric=train_loss",
]


def _checkpoint_of_another_model(d: Path) -> list[str]:
    _write(d / "data" / "a.parquet", pa.table(_good()))
    (d / "runs" / "r").mkdir(parents=True)
    started = load_config(None, [*_SMALL_RUN, f"data.train={d / 'data'}", "model.name=mlp"])
    claim_run(d / "runs" / "r", started)  # as the driver does when the run first starts
    return [f"--set={s}" for s in _SMALL_RUN] + ["--set=model.name=linear"]


@dataclass(frozen=True)
class Case:
    make: Callable[[Path], list[str]]
    words: tuple[str, ...]  # all in the one line after "raymb: error: "


CASES = {
    "missing-data-path": Case(_missing_path, ("data.train:", "no such file or directory", "nope")),
    "empty-dir": Case(_empty_dir, ("data.train:", "no parquet files under")),
    "zero-rows": Case(_zero_rows, ("data.train:", "is empty", "0 rows in 1 parquet file")),
    "notes-txt-among-data": Case(_notes_txt, ("not a parquet file", "notes.txt")),
    "corrupt-parquet": Case(_corrupt_parquet, ("not a parquet file", "b.parquet")),
    "missing-column": Case(_missing_column, ("a.parquet", "no label column 'label'")),
    "misnamed-column": Case(_misnamed_column, ("a.parquet", "no feature column 'feats'")),
    "wrong-dtype": Case(_wrong_dtype, ("a.parquet", "label column 'label'", "string")),
    "ragged-features": Case(_ragged, ("a.parquet", "column 'features' is ragged")),
    "inf-labels": Case(_inf_labels, ("b.parquet: 2 rows with NaN or inf in 'label'",)),
    "nan-in-val": Case(_nan_in_val, ("data.val:", "v.parquet: 1 row with NaN or inf in 'label'")),
    "more-workers-than-rows": Case(
        _more_workers_than_rows, ("data.train has 8 rows, fewer than scale.workers=16",)
    ),
    "microbatch-larger-than-shard": Case(
        _microbatch_larger_than_shard,
        ("train.microbatch_size=8 is larger than a worker's shard", "4 rows"),
    ),
    "full-batch-microbatch-larger-than-shard": Case(
        _full_batch_microbatch_larger_than_shard,
        ("train.microbatch_size=8 is larger than a worker's shard", "4 rows"),
    ),
    "config-type-error": Case(_config_type_error, ("train.epochs must be an integer", "'many'")),
    "config-file-type-error": Case(
        _config_file_type_error, ("scale.workers must be an integer", "'two'")
    ),
    "unknown-model": Case(_unknown_model, ("model.name must be", "linear, mlp")),
    "unimportable-model": Case(
        _unimportable_model, ("model.name 'no_such_package.models:build'", "cannot import")
    ),
    "missing-model-factory": Case(_missing_model_factory, ("no callable 'no_such_factory'",)),
    "set-without-equals": Case(_set_without_equals, ("--set 'train.epochs'", "section.key=value")),
    "checkpoint-of-another-model": Case(
        _checkpoint_of_another_model,
        ("run.json: checkpoint of model 'mlp'", "asks for model 'linear'", "use another run.name"),
    ),
}
NEEDS_DRIVER = {"checkpoint-of-another-model"}
# Until the driver calls claim_run, that case would train a whole run before failing: skip
# running it then (it runs, and must pass, as soon as the driver makes the call).
DRIVER_CLAIMS_RUNS = any(
    "claim_run(" in p.read_text() for p in (ROOT / "raymb" / "driver").glob("*.py")
)


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root, with a file's bytes (None for a directory)."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _run_cli(d: Path, args: list[str]) -> subprocess.CompletedProcess:
    base = [f"--set=data.train={d / 'data'}", f"--set=run.storage_path={d / 'runs'}"]
    base.append("--set=checkpoint.metric=train_loss")  # no data.val: pick a metric without it
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "raymb.cli", "train", *base, *args],
        cwd=d,  # anything written relative to the working directory shows up in the tree too
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def launched(request, tmp_path_factory):
    """Start the selected cases' CLIs at once; map each to (its directory, tree before, result)."""
    selected = {
        item.callspec.params["name"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec")
    }
    runs: dict[str, tuple[Path, dict, Future]] = {}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        for name, case in CASES.items():
            if name not in selected or (name in NEEDS_DRIVER and not DRIVER_CLAIMS_RUNS):
                continue
            d = tmp_path_factory.mktemp(name)
            args = case.make(d)
            runs[name] = (d, _tree(d), pool.submit(_run_cli, d, args))
        yield runs


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            n,
            marks=pytest.mark.xfail(
                not DRIVER_CLAIMS_RUNS, reason="needs driver wiring", run=False, strict=False
            )
            if n in NEEDS_DRIVER
            else (),
        )
        for n in CASES
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(launched, name):
    d, before, future = launched[name]
    proc = future.result()
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("raymb: error: "), proc.stderr[-2000:]
    for w in CASES[name].words:
        assert w in lines[0], (w, lines[0])
    assert _tree(d) == before, "no run directory, checkpoint, metrics.csv or summary.json"


def test_a_cached_file_gone_after_the_checks_is_one_line_naming_it(tmp_path):
    # The read tasks of a cached set (raymb.driver.cluster) run after the checks before Ray.
    from raymb.data.checks import read_blocks
    from raymb.errors import DataError

    there = tmp_path / "a.parquet"
    pq.write_table(pa.table({"x": np.arange(4, dtype=np.float32), "label": np.zeros(4)}), there)
    gone = tmp_path / "b.parquet"
    tables = read_blocks((str(there),), ("x",), None, "data.train")
    assert tables[0].column_names == ["x"] and tables[0].num_rows == 4
    with pytest.raises(DataError) as info:
        read_blocks((str(there), str(gone)), ("x", "label"), None, "data.train")
    message = str(info.value)
    assert message.startswith(f"data.train: could not read {gone} (") and "\n" not in message
