"""bench/ runs: every benchmark at its --quick size writes its JSON and table with sane values.

That the benchmarks run, not how fast: no figure is compared with a target here. The
Ray-based ones (marked `bench`: about 8 minutes together, so an opt-in tier, `python3 run.py
test -m bench`) share one local Ray session; startup starts Ray in its own subprocesses, so
it runs before that session exists (pytest runs a module's tests in file order). The
in-process ones (loop, models) run with the rest of the suite.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # bench/ is a directory of the repository, not installed

pytestmark = pytest.mark.timeout(900)


def _run(name: str, out: Path) -> dict:
    from bench.__main__ import main

    assert main([name, "--quick", "--out", str(out)]) == 0
    payload = json.loads((out / f"{name}.json").read_text())
    table = (out / f"{name}.md").read_text()
    assert table.startswith(f"### {name} (--quick)")
    assert payload["benchmark"] == name and payload["quick"] is True
    assert {"cpu", "cores", "ram_gib", "torch", "ray", "date"} <= set(payload["machine"])
    assert payload["rows"] and payload["duration_s"] > 0
    for key, header in payload["columns"]:
        assert header in table
        assert any(key in row for row in payload["rows"]), key
    for t in payload["targets"]:
        assert set(t) == {"name", "value", "goal", "met"}
    return payload


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_help_lists_every_benchmark():
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    for name in (
        "loop",
        "ingest",
        "epochs",
        "scaling",
        "startup",
        "microbatch",
        "strategies",
        "rng",
        "advice",
        "all",
    ):
        assert name in proc.stdout


def test_loop(tmp_path):
    payload = _run("loop", tmp_path)
    assert [r["model"] for r in payload["rows"]] == ["linear", "mlp [64, 64]", "mlp [64, 64]"]
    for row in payload["rows"]:
        assert _positive(row["torch_step_us"]) and _positive(row["raymb_step_us"])
        assert _positive(row["ratio"]) and _positive(row["peak_rss_mb"])
        assert row["max_param_diff"] < 1e-4  # the same math on the same batches
    assert len(payload["targets"]) == 2


def test_models(tmp_path):
    payload = _run("models", tmp_path)
    assert [r["unit"] for r in payload["rows"]] == ["tokens", "images"]
    for row in payload["rows"]:
        assert _positive(row["torch_rate"]) and _positive(row["raymb_rate"])
        assert _positive(row["ratio"]) and _positive(row["peak_rss_mb"])
        assert row["max_param_diff"] < 1e-4  # the same math on the same batches
    assert len(payload["targets"]) == 2


def test_advice(tmp_path):
    payload = _run("advice", tmp_path)
    whats = [r["what"] for r in payload["rows"]]
    assert [w.split(",")[0] for w in whats] == ["noise_scale"] * 4 + ["lr-find vs train"]
    for row in payload["rows"]:
        assert _positive(row["off_ms"]) and _positive(row["on_ms"])
    assert len(payload["targets"]) == 4


def test_rng(tmp_path):
    payload = _run("rng", tmp_path)
    draws = [r for r in payload["rows"] if "ms_per_million" in r]
    assert {r["what"] for r in draws} == {"uniform", "dropout mask", "normal"}
    assert all(_positive(r["ms_per_million"]) for r in draws)
    steps = [r for r in payload["rows"] if "cost" in r]
    assert [r["what"].split(",")[0] for r in steps] == [
        "gpt step",
        "cnn step",
        "cnn collate + step",
    ]
    for row in steps:
        assert _positive(row["without_ms"]) and _positive(row["with_ms"])
    assert len(payload["targets"]) == 1


@pytest.mark.ray
@pytest.mark.bench
def test_startup(tmp_path):
    from bench.startup import PHASES

    payload = _run("startup", tmp_path)
    minimal, raymb, resumed, joined = payload["rows"]
    for row in (minimal, raymb, resumed, joined):
        assert 0 < row["first_step_s"] <= row["total_s"]
        # Consecutive phases from the launch: together, the time to the first step.
        phases = [row[key] for key, _ in PHASES if key != "process_group_s"]
        assert all(p is not None and p >= 0 for p in phases), row
        assert math.isclose(sum(phases), row["first_step_s"], rel_tol=1e-6), row
        assert _positive(row["driver_peak_rss_mb"]) and _positive(row["worker_peak_rss_mb"])
    assert _positive(raymb["ratio"])


@pytest.mark.ray
@pytest.mark.bench
def test_tune(tmp_path):
    # A sweep and four plain runs, each launching its own local Ray (minutes on 2 cores).
    payload = _run("tune", tmp_path)
    one_by_one, sweep = payload["rows"]
    assert _positive(one_by_one["wall_s"]) and _positive(sweep["wall_s"])
    assert _positive(sweep["ratio"]) and len(payload["trial_overheads_s"]) == 4
    assert all(math.isfinite(s) for s in payload["trial_overheads_s"])


@pytest.mark.ray
@pytest.mark.bench
def test_epochs(tmp_path):
    # Before the module's Ray session: it launches both programs, then runs raymb in its own.
    payload = _run("epochs", tmp_path)
    script, raymb, overhead, logging = payload["rows"]
    for row in (script, raymb):
        assert 0 < row["first_step_s"] < row["wall_s"]
        assert _positive(row["steady_samples_per_s"])
    assert _positive(raymb["steady_ratio"]) and math.isfinite(overhead["overhead_s"])
    assert math.isfinite(logging["overhead_s"])


@pytest.mark.ray
@pytest.mark.bench
def test_ingest(ray_session, tmp_path):
    payload = _run("ingest", tmp_path)
    for row in payload["rows"]:
        assert _positive(row["rows_per_s"]), row
    trainer = payload["trainer"]
    assert _positive(trainer["rows_per_s_per_worker"]) and _positive(trainer["step_time_s"])
    assert 0 <= trainer["data_wait_fraction"] < math.inf


@pytest.mark.ray
@pytest.mark.bench
def test_scaling(ray_session, tmp_path):
    payload = _run("scaling", tmp_path)
    one, two = payload["rows"]
    assert (one["workers"], two["workers"]) == (1, 2)
    for row in (one, two):
        assert _positive(row["samples_per_s"]) and _positive(row["efficiency"])
        assert _positive(row["worker_peak_rss_mb"])
    assert one["bytes_per_step"] == 0 and two["bytes_per_step"] > 0


@pytest.mark.ray
@pytest.mark.bench
def test_microbatch(ray_session, tmp_path):
    payload = _run("microbatch", tmp_path)
    assert [r["k"] for r in payload["rows"]] == [1, 4]
    for row in payload["rows"]:
        assert _positive(row["samples_per_s"]) and _positive(row["worker_peak_rss_mb"])


@pytest.mark.ray
@pytest.mark.bench
def test_strategies(ray_session, tmp_path):
    payload = _run("strategies", tmp_path)
    rows = {r["strategy"]: r for r in payload["rows"]}
    assert set(rows) == {"grad", "param H=4", "diloco H=4"}
    for row in rows.values():
        assert _positive(row["val_loss"]) and 0 <= row["val_accuracy"] <= 1
        assert row["bytes_allreduced"] > 0 and row["samples"] == rows["grad"]["samples"]
    # Averaging every 4 steps sends far fewer bytes than a gradient all-reduce every step.
    assert rows["param H=4"]["bytes_vs_grad"] > 2
