"""What every benchmark shares: the machine, peak memory, a Ray session, raymb runs, results.

A benchmark module has `run(quick: bool) -> dict` returning `rows` (one dict per measured
configuration), `columns` (which row keys make the markdown table), `targets` and `notes`;
`save` adds the machine and writes NAME.json and NAME.md.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import math
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_WORKER = "ray::RayTrainWorker"
"""Process title of a Ray Train worker: the processes whose peak memory a run reports."""


# --- the machine ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, versions, date and load: enough to judge a figure by."""
    import ray
    import torch

    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ram = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        ram = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = [round(v, 1) for v in os.getloadavg()]
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gib": ram,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_at_start": load,
    }


# --- peak memory ---------------------------------------------------------------------------


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """Peak resident memory (VmHWM) of a process in MiB; this process falls back to getrusage."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    if pid == "self":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return None


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Restart a process's peak-RSS count (Linux clear_refs 5), so one phase has its own peak."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class ProcessPeaks:
    """Samples the peak RSS of descendant processes whose title starts with `prefix`.

    Ray Train workers are grandchildren of the process that started Ray (driver -> raylet
    -> worker) and die when a run ends, so their VmHWM is read while they live.
    """

    def __init__(self, prefix: str = TRAIN_WORKER, root: int | None = None, every_s: float = 0.2):
        self.prefix, self.root, self.every_s = prefix.encode(), root or os.getpid(), every_s
        self.peaks: dict[int, float] = {}
        self.root_mb: float | None = None
        """The root process's own peak (a driver started with subprocess)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def __enter__(self) -> ProcessPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def max_mb(self) -> float | None:
        """The largest single worker's peak RSS."""
        return max(self.peaks.values()) if self.peaks else None

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def _sample(self) -> None:
        root = peak_rss_mb(self.root)
        if root is not None:
            self.root_mb = max(root, self.root_mb or 0.0)
        for pid in _descendants(self.root):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(self.prefix):
                peak = peak_rss_mb(pid)
                if peak is not None:
                    self.peaks[pid] = max(peak, self.peaks.get(pid, 0.0))


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


# --- statistics ----------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else float("nan")


def alternate(variants: Sequence[Any], reps: int) -> Iterator[tuple[int, Any]]:
    """(rep, variant) pairs, the variants' order reversed every other repetition, so a drift
    in the machine's load hits each of them alike."""
    for rep in range(reps):
        for variant in variants if rep % 2 == 0 else list(reversed(variants)):
            yield rep, variant


# --- Ray and raymb -------------------------------------------------------------------------


@contextlib.contextmanager
def ray_session(num_cpus: int = 4) -> Iterator[None]:
    """One local Ray session; an existing one (a test's, `python -m bench all`) is reused."""
    import ray

    if ray.is_initialized():
        yield
        return
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def dataset(
    out: Path, rows: int, *, features: int = 32, classes: int = 3, shards: int = 8, **kw
) -> Path:
    """A seeded classification set (raymb gen-data) under `out`; returns its directory."""
    from raymb.data.synthetic import generate

    generate(
        "classification", out, rows=rows, shards=shards, features=features, classes=classes, **kw
    )
    return out


def train_run(data: Path, storage: Path, name: str, overrides: Sequence[str]) -> dict[str, Any]:
    """One raymb.train run in this process's Ray session: summary, metrics rows, worker peak."""
    from raymb import load_config, train

    sets = [
        f"data.train={data / 'train'}",
        f"data.val={data / 'val'}" if (data / "val").exists() else "data.val=none",
        f"run.storage_path={storage}",
        f"run.name={name}",
        *overrides,
    ]
    if not (data / "val").exists():
        sets.append("checkpoint.metric=train_loss")
    started = time.perf_counter()
    with ProcessPeaks() as peaks:
        result = train(load_config(None, sets))
    wall = time.perf_counter() - started
    with open(result.run_dir / "metrics.csv", newline="") as f:
        metrics = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    later = [row["samples_per_s"] for row in metrics[1:]]
    return {
        "summary": result.summary,
        # summary.json's samples/s counts the first window's wait for Ray Data to start;
        # the windows after it show the rate a longer run settles at.
        "steady_samples_per_s": median(later) if later else result.summary["samples_per_s"],
        "metrics": metrics,
        "worker_peak_rss_mb": peaks.max_mb,
        "wall_s": wall,
    }


def steady(metrics: list[dict[str, Any]], key: str) -> float:
    """Step-weighted mean of a per-window average (step_time_s, data_wait_s) over the
    windows after the first: the first holds Ray Data's start-up, paid once per run."""
    total = weight = 0.0
    previous = 0
    for i, row in enumerate(metrics):
        steps = row["step"] - previous
        previous = row["step"]
        if i == 0 and len(metrics) > 1:
            continue
        total += row[key] * steps
        weight += steps
    return total / weight if weight else float("nan")


def _number(text: str) -> Any:
    try:
        value = float(text)
    except ValueError:
        return text or None
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


# --- results -------------------------------------------------------------------------------


def save(name: str, result: dict[str, Any], out: Path, *, quick: bool) -> dict[str, Any]:
    """Write out/NAME.json and out/NAME.md; return the JSON payload."""
    payload = _finite({"benchmark": name, "quick": quick, "machine": machine(), **result})
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(
        json.dumps(payload, indent=2, allow_nan=False, default=_plain) + "\n"
    )
    (out / f"{name}.md").write_text(markdown(payload))
    return payload


def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = [
        f"### {payload['benchmark']}{' (--quick)' if payload['quick'] else ''}",
        "",
        f"{payload.get('description', '')}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}; "
        f"Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), "
        f"ray {m['ray']}; {m['date']}; load average at start {m['loadavg_at_start']}; "
        f"took {payload.get('duration_s', float('nan')):.0f} s.",
        "",
    ]
    columns = payload["columns"]
    lines.append("| " + " | ".join(header for _, header in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in payload["rows"]:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    if payload.get("targets"):
        lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
        for t in payload["targets"]:
            met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
            lines.append(f"| {t['name']} | {_cell(t['value'])} | {t['goal']} | {met} |")
    if payload.get("notes"):
        lines += [""] + [f"- {note}" for note in payload["notes"]]
    return "\n".join(lines) + "\n"


def target(name: str, value: float | None, goal: str, met: bool | None) -> dict[str, Any]:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        met = None
    return {"name": name, "value": value, "goal": goal, "met": met}


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 0.01:
            return f"{value:.3f}"
        return f"{value:.2e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _finite(value: Any) -> Any:
    """NaN and infinities become null: strict JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
