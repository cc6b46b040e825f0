"""Ingest: Ray Data read_parquet -> iter_torch_batches, and how long the trainer waits for it.

Part 1, one consumer in the driver (what one worker's iterator can deliver): rows/s of
pyarrow reading the parquet files straight into tensors (the no-Ray baseline) and of Ray
Data with an Arrow collate (raymb.columns.table_to_tensors) at several prefetch_batches, Ray
Data's default numpy collate, and a larger batch; and raymb's cached source (read once,
then each batch an index gather in a fresh permutation). Variants alternate, repetition by
repetition.

Part 2, the trainer: `raymb.train` of the mlp on the same data (2 workers), once with
data.shuffle = "rows" (the default) and once with "none"; metrics.csv gives the time each
step waited for its rows (data_wait_s) and the time it computed (step_time_s).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.harness import (
    alternate,
    dataset,
    median,
    peak_rss_mb,
    ray_session,
    reset_peak_rss,
    steady,
    target,
    train_run,
)

MICROBATCH = 256
"""Rows per batch: the trainer's microbatch below (G = 512 over 2 workers, k = 1)."""
TARGET = 0.05
SHUFFLE_TARGET = 0.10
# (label, reader, prefetch_batches, batch size); "raymb" is what raymb.worker.feed does.
VARIANTS = {
    "pyarrow, no Ray (baseline)": ("pyarrow", None, MICROBATCH),
    "raymb cached: read once, gather rows of a permutation": ("cached", None, MICROBATCH),
    "ray, Arrow collate, prefetch 2": ("arrow", 2, MICROBATCH),
    "ray, Arrow collate, prefetch 1": ("arrow", 1, MICROBATCH),
    "ray, Arrow collate, prefetch 4": ("arrow", 4, MICROBATCH),
    "ray, default numpy collate, prefetch 2": ("numpy", 2, MICROBATCH),
    "ray, Arrow collate, prefetch 2, batch 2048": ("arrow", 2, 2048),
}
QUICK = ("pyarrow, no Ray (baseline)", "raymb cached: read once, gather rows of a permutation")


def run(quick: bool) -> dict:
    rows_n = 20_000 if quick else 1_000_000
    reps = 1 if quick else 3
    workers, epochs = 2, 1
    names = QUICK if quick else tuple(VARIANTS)
    with tempfile.TemporaryDirectory() as tmp, ray_session():
        data = dataset(Path(tmp) / "data", rows_n, shards=16, val_fraction=0.01)
        results: dict[str, list[dict]] = {name: [] for name in names}
        for _, name in alternate(names, reps):
            results[name].append(_read(data / "train", *VARIANTS[name]))
        trainers = {
            shuffle: train_run(
                data,
                Path(tmp) / "runs",
                f"ingest-{shuffle}",
                [
                    "model.name=mlp",
                    f"scale.workers={workers}",
                    f"train.global_batch_size={MICROBATCH * workers}",
                    f"train.epochs={epochs}",
                    f"data.shuffle={shuffle}",
                    "train.log_every=25" if quick else "train.log_every=100",
                ],
            )
            for shuffle in ("none", "rows")
        }
    trainer = trainers["rows"]
    shuffle_cost = 1 - (
        trainers["rows"]["steady_samples_per_s"] / trainers["none"]["steady_samples_per_s"]
    )

    base = median([r["rows_per_s"] for r in results[names[0]]])
    rows = []
    for name in names:
        runs = results[name]
        rate = median([r["rows_per_s"] for r in runs])
        rows.append(
            {
                "variant": name,
                "rows_per_s": rate,
                "steady_rows_per_s": median([r["steady_rows_per_s"] for r in runs]),
                "first_batch_s": median([r["first_batch_s"] for r in runs]),
                "vs_baseline": rate / base,
                "peak_rss_mb": max(r["peak_rss_mb"] or 0 for r in runs),
            }
        )

    metrics, summary = trainer["metrics"], trainer["summary"]
    wait, step = steady(metrics, "data_wait_s"), steady(metrics, "step_time_s")
    first = metrics[0]
    whole_wait = sum(r["data_wait_s"] * n for r, n in zip(metrics, _steps(metrics)))
    whole_step = sum(r["step_time_s"] * n for r, n in zip(metrics, _steps(metrics)))
    fraction = wait / step if step else float("nan")
    rows.append(
        {
            "variant": f"raymb.train mlp, {workers} workers, G={MICROBATCH * workers} (per worker)",
            "rows_per_s": summary["samples_per_s"] / workers,
            # metrics.csv's samples/s counts every worker's rows
            "steady_rows_per_s": median([r["samples_per_s"] for r in metrics[1:]]) / workers,
            "first_batch_s": first["data_wait_s"],
            "peak_rss_mb": trainer["worker_peak_rss_mb"],
        }
    )
    trainer_row = {
        "steps": summary["steps"],
        "samples_per_s": summary["samples_per_s"],
        "rows_per_s_per_worker": summary["samples_per_s"] / workers,
        "data_wait_s_per_step": wait,
        "step_time_s": step,
        "data_wait_fraction": fraction,
        "data_wait_fraction_with_first_window": whole_wait / whole_step if whole_step else None,
        "first_window_wait_s_per_step": first["data_wait_s"],
        "worker_peak_rss_mb": trainer["worker_peak_rss_mb"],
        "wall_s": trainer["wall_s"],
    }
    return {
        "description": f"{rows_n:,} rows x 32 float32 features + int64 label in 16 parquet "
        f"shards, batches of {MICROBATCH} rows unless named; rows/s = rows / time from "
        "creating the iterator to its end (steady: after the first batch); "
        f"median of {reps} alternating repetitions. The last row is the trainer's own rate.",
        "params": {"rows": rows_n, "microbatch": MICROBATCH, "reps": reps, "workers": workers},
        "columns": [
            ("variant", "reader"),
            ("rows_per_s", "rows/s"),
            ("steady_rows_per_s", "rows/s after the first batch"),
            ("first_batch_s", "first batch (s)"),
            ("vs_baseline", "vs pyarrow"),
            ("peak_rss_mb", "peak RSS (MiB)"),
        ],
        "rows": rows,
        "trainer": trainer_row,
        "shuffle": {
            k: {"steady_samples_per_s": t["steady_samples_per_s"], "wall_s": t["wall_s"]}
            for k, t in trainers.items()
        },
        "targets": [
            target(
                "mlp trainer: data wait / step time (after the first window), shuffle rows",
                fraction,
                f"<= {TARGET}",
                fraction <= TARGET,
            ),
            target(
                "shuffle rows: throughput lost against none",
                shuffle_cost,
                f"<= {SHUFFLE_TARGET}",
                shuffle_cost <= SHUFFLE_TARGET,
            ),
        ],
        "notes": [
            "Peak RSS: the driver process per reader variant (VmHWM reset before each; Ray "
            "Data's blocks live in the shared object store, not in this figure); the largest "
            "Ray Train worker for the trainer row.",
            f"Trainer: {summary['steps']} steps; waited {wait * 1e3:.3f} ms per step for "
            f"batches against {step * 1e3:.3f} ms of compute after the first report window; "
            f"the first window waited {first['data_wait_s'] * 1e3:.1f} ms per step on average.",
            "Shuffle cost: steady samples/s of the trainer with data.shuffle = rows against "
            f"none: {shuffle_cost:+.1%} ({trainers['rows']['steady_samples_per_s']:,.0f} vs "
            f"{trainers['none']['steady_samples_per_s']:,.0f}).",
        ],
    }


def _steps(metrics: list[dict]) -> list[int]:
    previous, out = 0, []
    for row in metrics:
        out.append(row["step"] - previous)
        previous = row["step"]
    return out


def _read(path: Path, reader: str, prefetch: int | None, batch: int) -> dict:
    """Time one pass over the dataset in batches of `batch` rows, as (x, y) tensors."""
    reset_peak_rss()
    started = time.perf_counter()
    first = None
    rows = 0
    for _x, y in _batches(path, reader, prefetch, batch):
        rows += len(y)
        if first is None:
            first = time.perf_counter()
            first_rows = rows
    done = time.perf_counter()
    return {
        "rows": rows,
        "rows_per_s": rows / (done - started),
        "steady_rows_per_s": (rows - first_rows) / (done - first) if done > first else None,
        "first_batch_s": first - started,
        "peak_rss_mb": peak_rss_mb(),
    }


def _batches(path: Path, reader: str, prefetch: int | None, batch: int):
    from raymb.data.columns import table_to_tensors

    if reader == "pyarrow":
        import pyarrow as pa
        import pyarrow.parquet as pq

        for file in sorted(path.glob("*.parquet")):
            for record_batch in pq.ParquetFile(file).iter_batches(batch_size=batch):
                yield table_to_tensors(pa.Table.from_batches([record_batch]), "features", "label")
        return

    import ray.data

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.read_parquet(str(path))
    if reader == "cached":
        import pyarrow as pa
        import torch

        from raymb.core.order import epoch_order

        refs = ds.materialize().to_arrow_refs()
        tables = ray.get(refs)
        x, y = table_to_tensors(pa.concat_tables(tables), "features", "label")
        order = epoch_order("rows", 0, 0, [len(y)])
        for i in range(0, len(y), batch):
            rows = order[i : i + batch]
            yield torch.index_select(x, 0, rows), y[rows]
        return
    if reader == "arrow":
        from ray.data.collate_fn import ArrowBatchCollateFn

        class ArrowCollate(ArrowBatchCollateFn):
            def __call__(self, table):
                return table_to_tensors(table, "features", "label")

        collate = ArrowCollate()
        yield from ds.iter_torch_batches(
            batch_size=batch, collate_fn=collate, prefetch_batches=prefetch
        )
        return
    for b in ds.iter_torch_batches(batch_size=batch, prefetch_batches=prefetch):
        yield b["features"], b["label"]
