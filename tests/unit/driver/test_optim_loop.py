"""optim.l1 and full-batch L-BFGS on the real loop (raymb.driver.local.train_torch: the epoch
loop, steps, sync and checkpoints of `raymb train` on gloo processes, no Ray), against numpy's
solutions of the same problems: the lasso (by ISTA in float64) and least squares (lstsq)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raymb import load_config
from raymb.driver.local import train_torch
from raymb.rundir.checkpoint import STATE_FILE, read
from raymb.tools.load import load_model


def _write(folder: Path, x: np.ndarray, y: np.ndarray, shards: int = 2) -> Path:
    """A features vector column and a float label, in `shards` files; returns `folder`."""
    folder.mkdir(parents=True)
    for i, (xs, ys) in enumerate(zip(np.array_split(x, shards), np.array_split(y, shards))):
        flat = pa.array(np.ascontiguousarray(xs, dtype=np.float32).reshape(-1))
        table = pa.table(
            {
                "features": pa.FixedSizeListArray.from_arrays(flat, x.shape[1]),
                "label": pa.array(ys.astype(np.float32)),
            }
        )
        pq.write_table(table, folder / f"part-{i:05d}.parquet")
    return folder


def _train(data: Path, runs: Path, name: str, *sets: str) -> Path:
    config = load_config(
        None,
        [
            f"data.train={data}",
            "data.val=",
            f"run.storage_path={runs}",
            f"run.name={name}",
            "train.global_batch_size=all",
            "train.log_every=1",
            *sets,
        ],
    )
    return train_torch(config)


def _params(model_pt: Path) -> np.ndarray:
    """The linear model's parameters as float64: the weights, then the bias."""
    state = read(model_pt)["state_dict"]
    return torch.cat([state["weight"].double().flatten(), state["bias"].double()]).numpy()


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f)]


# ---------------------------------------------------------------- L1: the lasso

D, RELEVANT, LAMBDA, LR = 20, {0: 2.0, 1: -3.0, 2: 1.5}, 0.1, 0.2


@pytest.fixture(scope="module")
def sparse(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """y = 2 x0 - 3 x1 + 1.5 x2 + 0.5 + noise: 3 of 20 features matter."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((240, D)).astype(np.float32)
    w = np.zeros(D)
    for j, value in RELEVANT.items():
        w[j] = value
    y = (x @ w + 0.5 + 0.1 * rng.standard_normal(240)).astype(np.float32)
    return _write(tmp_path_factory.mktemp("sparse") / "train", x, y), x, y


def _lasso(x: np.ndarray, y: np.ndarray, lam: float, steps: int = 20000) -> np.ndarray:
    """argmin (1/N) |X w + b - y|^2 + lam |w|_1 (b not penalised), by ISTA in float64 until
    it no longer moves: [w..., b]."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    n = len(y)
    w, b = np.zeros(x.shape[1]), 0.0
    step = 0.5 / np.linalg.eigvalsh(2 * np.c_[x, np.ones(n)].T @ np.c_[x, np.ones(n)] / n).max()
    for _ in range(steps):
        r = x @ w + b - y
        w = w - step * 2 * x.T @ r / n
        b = b - step * 2 * r.mean()
        w = np.sign(w) * np.maximum(np.abs(w) - step * lam, 0.0)
    return np.r_[w, b]


def test_l1_zeros_the_irrelevant_weights_as_the_lasso_does(sparse, tmp_path):
    data, x, y = sparse
    model_pt = _train(
        data,
        tmp_path,
        "lasso",
        "scale.workers=2",
        "train.microbatch_size=40",  # 120 rows a worker: k = 3
        "train.epochs=150",  # one full-batch step an epoch: ISTA's 150 iterations
        "optim.name=sgd",
        "optim.momentum=0",
        f"optim.lr={LR}",
        "optim.warmup_steps=5",  # the threshold follows the schedule's lr
        f"optim.l1={LAMBDA}",
        "model.init=orthogonal",  # another start: the lasso's minimum is the same
    )
    got = _params(model_pt)
    lasso = _lasso(x, y, LAMBDA)
    irrelevant = [j for j in range(D) if j not in RELEVANT]
    assert all(lasso[j] == 0 for j in irrelevant)  # the reference: a sparse solution
    zeros = [j for j in irrelevant if got[j] == 0.0]  # exactly 0, not small
    assert len(zeros) >= 15, got
    np.testing.assert_allclose(got, lasso, rtol=0, atol=2e-4)
    # The relevant weights are shrunk as the lasso shrinks them: towards 0, by about
    # lam / 2 (the curvature of the mean square is 2 per unit-variance feature).
    ols = np.linalg.lstsq(np.c_[x, np.ones(len(y))].astype(np.float64), y, rcond=None)[0]
    for j in RELEVANT:
        assert abs(got[j]) < abs(ols[j]) - LAMBDA / 4
    # The checkpoint rebuilds (model.init aside: the saved weights are loaded).
    rebuilt, _ = load_model(model_pt)
    np.testing.assert_array_equal(rebuilt.weight.detach().double().numpy()[0], got[:D])


# ---------------------------------------------------------------- L-BFGS: least squares

LBFGS = (
    "optim.name=lbfgs",
    "optim.lr=1",
    "optim.max_iter=5",  # a few iterations a step: the first 3 steps are not converged yet
    "train.microbatch_size=32",
    "train.epochs=6",
)


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """Least squares with unequally scaled features (so L-BFGS needs its iterations); returns
    the data and numpy's lstsq solution [w..., b]."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((256, 8)) * np.linspace(0.5, 3.0, 8)).astype(np.float32)
    w = 10 * rng.standard_normal(8)
    y = (x @ w - 1.0 + 0.3 * rng.standard_normal(256)).astype(np.float32)
    design = np.c_[x, np.ones(len(y))].astype(np.float64)
    solution = np.linalg.lstsq(design, y.astype(np.float64), rcond=None)[0]
    return _write(tmp_path_factory.mktemp("squares") / "train", x, y), solution


@pytest.fixture(scope="module")
def lbfgs_runs(squares, tmp_path_factory) -> dict[str, Path]:
    """The same run on 2 workers and on 1; and on 2 stopped after 2 steps, then resumed."""
    data, _ = squares
    runs = tmp_path_factory.mktemp("lbfgs-runs")
    out = {
        "W2": _train(data, runs, "w2", "scale.workers=2", *LBFGS),
        "W1": _train(data, runs, "w1", "scale.workers=1", *LBFGS),
    }
    stopped = _train(data, runs, "resumed", "scale.workers=2", *LBFGS, "train.max_steps=2")
    out["stopped"] = stopped.parent / STATE_FILE
    (out["stopped"].parent.parent / "stopped-state.pt").write_bytes(out["stopped"].read_bytes())
    out["stopped"] = out["stopped"].parent.parent / "stopped-state.pt"
    out["resumed"] = _train(data, runs, "resumed", "scale.workers=2", *LBFGS)
    return out


def test_lbfgs_reaches_the_least_squares_solution(squares, lbfgs_runs):
    _, solution = squares
    got = _params(lbfgs_runs["W2"])
    assert np.linalg.norm(got - solution) / np.linalg.norm(solution) < 1e-5
    # Not a tautology: the first step's loss was far above the last.
    losses = _losses(lbfgs_runs["W2"].parent.parent)
    assert losses[0] > 10 * losses[-1]


def test_lbfgs_on_two_workers_takes_one_processs_steps(lbfgs_runs):
    w2, w1 = lbfgs_runs["W2"].parent.parent, lbfgs_runs["W1"].parent.parent
    np.testing.assert_allclose(_losses(w2), _losses(w1), rtol=1e-5)
    # The same line-search decisions: as many loss and gradient evaluations, and iterations.
    two, one = _lbfgs_state(lbfgs_runs["W2"]), _lbfgs_state(lbfgs_runs["W1"])
    assert (two["func_evals"], two["n_iter"]) == (one["func_evals"], one["n_iter"])
    np.testing.assert_allclose(_params(lbfgs_runs["W2"]), _params(lbfgs_runs["W1"]), rtol=1e-5)


def test_lbfgs_resumes_exactly(lbfgs_runs):
    stopped = read(lbfgs_runs["stopped"])
    assert stopped["progress"]["step"] == 2 and stopped["optimizer"]["state"]  # LBFGS's own
    straight, resumed = _lbfgs_state(lbfgs_runs["W2"]), _lbfgs_state(lbfgs_runs["resumed"])
    # The resumed run continued L-BFGS's history (a fresh one would count from 0 again).
    assert (resumed["func_evals"], resumed["n_iter"]) == (
        straight["func_evals"],
        straight["n_iter"],
    )
    for a, b in zip(straight["old_dirs"], resumed["old_dirs"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    np.testing.assert_allclose(
        _params(lbfgs_runs["resumed"]), _params(lbfgs_runs["W2"]), rtol=1e-6, atol=0
    )
    run_dir = lbfgs_runs["resumed"].parent.parent
    assert _losses(run_dir) == pytest.approx(_losses(lbfgs_runs["W2"].parent.parent), rel=1e-6)


def _lbfgs_state(model_pt: Path) -> dict:
    """torch.optim.LBFGS's state in the checkpoint beside model.pt (one parameter group)."""
    (state,) = read(model_pt.parent / STATE_FILE)["optimizer"]["state"].values()
    return state
