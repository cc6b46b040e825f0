"""`raymb lr-find` (raymb.core.lr_find, raymb.worker.lr_find) on the real loop on gloo
processes (raymb.driver.lr_find.lr_find with backend="gloo", no Ray): on a quadratic whose best
constant rate is known in closed form, the suggestion lies within a factor of 3 of it; W = 2
draws W = 1's curve at the same G (the second test clearing the first's folder); the run's own
directory is untouched; a rate that diverges at once stops with a clear error. Bad
--min/--max/--steps are refused in one line (tests/unit/driver/test_lr_find_refusals.py has
the rest)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_refused, tree

from raymb import load_config
from raymb.core.lr_find import DIVERGED, Curve, check_range, schedule, suggest
from raymb.driver.lr_find import conclude, lr_find
from raymb.errors import RaymbError

pytestmark = pytest.mark.timeout(600)

ROWS, D = 4096, 4


@pytest.fixture(scope="module")
def quadratic(tmp_path_factory):
    """y = x . w + b + small noise, the feature columns standardised: the mean squared error is
    a quadratic with Hessian 2 X'X / N (X = [x, 1]), close to 2 I."""
    out = tmp_path_factory.mktemp("quadratic") / "train"
    out.mkdir()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((ROWS, D))
    x = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)
    y = (x @ np.array([2.0, -1.0, 1.5, 0.5]) + 1.0 + 0.1 * rng.standard_normal(ROWS)).astype(
        np.float32
    )
    flat = pa.array(x.reshape(-1))
    table = pa.table({"features": pa.FixedSizeListArray.from_arrays(flat, D), "label": y})
    pq.write_table(table, out / "part-00000.parquet")
    return out, x.astype(np.float64)


def _best_constant_lr(x: np.ndarray) -> float:
    """Gradient descent on a quadratic with Hessian eigenvalues in [mu, L] contracts fastest
    at the constant rate 2 / (mu + L)."""
    X = np.hstack([x, np.ones((len(x), 1))])
    eig = np.linalg.eigvalsh(2 * X.T @ X / len(x))
    return float(2 / (eig[0] + eig[-1]))


def _config(data, tmp_path, *sets):
    return load_config(
        None,
        [
            f"data.train={data}",
            "model.name=linear",
            "optim.name=sgd",
            "optim.momentum=0",  # plain gradient descent: its best rate is 2 / (mu + L)
            "train.global_batch_size=64",
            f"run.storage_path={tmp_path}",
            "run.name=quad",
            *sets,
        ],
    )


def lr_find_torch(config, **kwargs):
    """The command's own driver (its folder checks, lock and marker) on gloo processes."""
    return lr_find(config, backend="gloo", **kwargs)


def test_quadratic_suggestion_and_w2_equals_w1(quadratic, tmp_path):
    data, x = quadratic
    best = _best_constant_lr(x)
    assert 0.45 < best < 0.55  # about 1/2: the Hessian is about 2 I
    run_dir = tmp_path / "quad"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("step,train_loss\n1,0.5\n")  # a run's own files
    before = tree(run_dir)
    found = {}
    for workers in (1, 2):
        config = _config(data, tmp_path, f"scale.workers={workers}")
        found[workers] = lr_find_torch(config, low=1e-3, high=100.0, steps=25)
        with open(tmp_path / "quad-lr-find" / "lr_find.csv", newline="") as f:
            found[workers, "csv"] = list(csv.DictReader(f))
    one, two = found[1], found[2]
    assert one.suggested is not None
    assert best / 3 <= one.suggested <= 3 * best, (one.suggested, best)
    # The stop rule ended it early, on the same step, and the curves agree.
    assert one.stop_reason is not None and len(one.lrs) < 25
    assert len(found[1, "csv"]) == len(found[2, "csv"]) == len(one.lrs)
    assert one.lrs == two.lrs
    for a, b in zip(one.losses, two.losses):
        assert math.isclose(a, b, rel_tol=1e-5) or not math.isfinite(a), (a, b)
    assert one.suggested == two.suggested
    assert (tmp_path / "quad-lr-find" / "lr_find.csv").exists()
    marker = json.loads((tmp_path / "quad-lr-find" / "lr_find.json").read_text())
    assert marker["status"] == "finished" and marker["suggested"] == two.suggested
    assert tree(run_dir) == before  # the run's own directory: untouched
    assert conclude(one, 25) == f"raymb: suggested optim.lr={one.suggested:.3g}"


def test_a_rate_that_diverges_at_once_stops_with_a_clear_error(quadratic, tmp_path):
    data, _ = quadratic
    config = _config(data, tmp_path, "scale.workers=1")
    result = lr_find_torch(config, low=1.0, high=10.0, steps=100)
    assert result.suggested is None and len(result.lrs) < 10
    with pytest.raises(RaymbError, match="diverged within .* try a lower --min"):
        conclude(result, 100)


def test_schedule_curve_and_suggestion_by_hand():
    lrs = schedule(1e-4, 1.0, 5)
    assert lrs[0] == 1e-4 and math.isclose(lrs[-1], 1.0) and math.isclose(lrs[1], 1e-3)
    curve = Curve()
    assert not curve.add(0.1, 2.0) and curve.smoothed == [2.0]  # debiased: the first loss
    assert not curve.add(0.2, 1.0)
    assert curve.add(0.3, 1000.0)  # the smoothed loss passes 4x its lowest
    assert f"{DIVERGED:g}x its lowest" in curve.stop_reason
    assert Curve().add(0.1, math.nan)  # a loss that is not finite stops at once
    # A loss falling fastest at lr = 1e-2 (a logistic in log10 lr), flat elsewhere.
    rates = schedule(1e-5, 1.0, 51)
    smooth = [1 / (1 + math.exp(4 * (math.log10(r) + 2))) for r in rates]
    assert math.isclose(suggest(rates, smooth), 1e-2, rel_tol=0.01)
    assert suggest(rates[:9], smooth[:9]) is None  # too few points
    assert suggest(rates, [1.0 + i for i in range(51)]) is None  # nothing falls
    assert check_range(1e-7, 10, 100) is None


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--min", "1", "--max", "1"], ["--min 1 must be below --max 1"]),
        (["--min", "2", "--max", "1"], ["--min", "--max"]),
        (["--steps", "9"], ["--steps 9", "at least 10"]),
    ],
)
def test_bad_range_is_refused(tmp_path, args, words):
    assert_refused(["lr-find", *args], tmp_path, *words)
