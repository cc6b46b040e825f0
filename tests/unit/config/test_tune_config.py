"""Issue 24, the config's part: [tune] and [tune.space] are checked before anything starts
(every grid point's config, a random space's bounds and draws), a grid expands to the trials
Ray Tune runs, and the folds of cross-validation follow the fold rule. No Ray."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_refused

from raymb import ConfigError
from raymb.config import Config
from raymb.config.tune import repeat_seeds
from raymb.core.order import fold_rows, fold_seed
from raymb.load import load_sweep

BASE = """
[run]
name = "sweep"
[data]
train = "data/train"
[train]
global_batch_size = 64
microbatch_size = 16
"""


def _write(tmp_path: Path, tune: str, base: str = BASE) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(base + "\n" + tune)
    return path


@pytest.mark.parametrize(
    "tune, words",
    [
        ('[tune.space]\n"optim.lrr" = [0.1]', ['tune.space."optim.lrr" is not a config key']),
        ('[tune.space]\n"optim.lr" = []', ["empty list"]),
        (
            '[tune]\nsearch = "random"\n[tune.space]\n"optim.lr" = { loguniform = [0.0, 1] }',
            ["loguniform needs bounds > 0"],
        ),
        (
            '[tune.space]\n"train.global_batch_size" = [64, 24]',
            ["train.global_batch_size=24", "larger than a worker's share"],
        ),
        (
            '[tune]\nsearch = "random"\n[tune.space]\n'
            '"train.global_batch_size" = { randint = [20, 30] }',
            ["train.global_batch_size", "larger than a worker's share"],
        ),
        ('[tune.space]\n"optim.lr" = { uniform = [0.1, 1] }', ['needs tune.search = "random"']),
        ('[tune.space]\n"run.name" = ["a", "b"]', ["a sweep sets run.name itself"]),
        ('[tune]\ncv_folds = 1\n[tune.space]\n"optim.lr" = [0.1]', ["tune.cv_folds"]),
        ("[tune]\n", ["[tune.space] is empty"]),
        ('[tune]\nsearch = "grd"\n[tune.space]\n"optim.lr" = [0.1]', ["tune.search"]),
    ],
)
def test_a_bad_sweep_is_one_line_before_anything_starts(tmp_path, tune, words):
    _write(tmp_path, tune)
    assert_refused(["tune", "--config", "sweep.toml"], tmp_path, *words)


def test_raymb_train_refuses_a_sweep_config_naming_raymb_tune(tmp_path):
    _write(tmp_path, '[tune.space]\n"optim.lr" = [0.1]')
    assert_refused(["train", "--config", "sweep.toml"], tmp_path, "[tune]", "raymb tune")


def test_optuna_missing_names_the_extra(tmp_path, monkeypatch):
    path = _write(tmp_path, '[tune]\nsearch = "optuna"\n[tune.space]\n"optim.lr" = [0.1]')
    real = importlib.util.find_spec
    # optuna is installed here (the test extra); a machine without it finds no spec.
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"raymb\[tune\]"):
        load_sweep(path)


def test_a_grid_is_every_combination_repeated_with_drawn_seeds(tmp_path):
    path = _write(
        tmp_path,
        '[tune]\nsamples = 2\n[tune.space]\n"optim.lr" = [0.1, 0.2, 0.3]\n'
        '"optim.name" = ["sgd", "adam"]',
    )
    sweep = load_sweep(path, ["train.seed=7"])
    trials = sweep.grid()
    assert len(trials) == 12
    seeds = repeat_seeds(7, 2)
    assert seeds[0] == 7 and seeds[1] != 7
    expected = {
        (lr, name, seed)
        for lr, name, seed in itertools.product([0.1, 0.2, 0.3], ["sgd", "adam"], seeds)
    }
    assert {(t["optim.lr"], t["optim.name"], t["train.seed"]) for t in trials} == expected
    assert sweep.keys == ["optim.lr", "optim.name", "train.seed"]
    raw = sweep.trial_raw(trials[0], storage="runs/sweep/trials", name="trial-000")
    config = Config.from_dict(raw)
    assert (config.run.storage_path, config.run.name) == ("runs/sweep/trials", "trial-000")
    assert config.optim.lr == trials[0]["optim.lr"]
    best = Config.from_dict(sweep.best_raw(trials[0]))
    assert best.run.name == "sweep-best" and best.train.seed == trials[0]["train.seed"]


def test_print_config_shows_the_tune_sections(tmp_path):
    from raymb.cli import main

    _write(tmp_path, '[tune]\nscheduler = "asha"\n[tune.space]\n"optim.lr" = [0.1, 0.2]')
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert main(["tune", "--config", str(tmp_path / "sweep.toml"), "--print-config"]) == 0
    printed = text.getvalue()
    assert '[tune]\nmetric = "train_loss"' in printed  # no data.val: checkpoint.metric's
    assert 'scheduler = "asha"' in printed and '"optim.lr" = [0.1, 0.2]' in printed


def test_the_folds_partition_the_rows_by_the_fold_rule():
    total, k, seed = 103, 4, 11
    # The rule, computed apart: a permutation of the rows from the fold seed; fold f holds
    # out the rows at positions f, f + k, f + 2k, ...
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(fold_seed(seed)))
    held_by_hand = [sorted(int(perm[p]) for p in range(total) if p % k == f) for f in range(k)]
    union = []
    for f in range(k):
        train, held = fold_rows(seed, total, k, f)
        assert held.tolist() == held_by_hand[f]
        assert sorted(train.tolist() + held.tolist()) == list(range(total))
        union += held.tolist()
    assert sorted(union) == list(range(total))  # every row held out exactly once
    assert fold_rows(seed + 1, total, k, 0)[1].tolist() != held_by_hand[0]  # the seed counts


def test_a_fold_config_is_an_ordinary_config(tmp_path):
    path = _write(tmp_path, '[tune]\ncv_folds = 3\n[tune.space]\n"optim.lr" = [0.1]')
    sweep = load_sweep(path)
    raw = sweep.trial_raw({"optim.lr": 0.1}, storage="runs/s/trials", name="trial-000")
    fold = Config.from_dict(sweep.fold_raw(raw, 2, storage="runs/s/trials/trial-000"))
    assert (fold.data.folds, fold.data.fold, fold.data.val) == (3, 2, None)
    assert fold.run.name == "fold-2"
    with pytest.raises(ConfigError, match="data.fold"):
        Config.from_dict(json.loads(json.dumps({"data": {"train": "x", "folds": 3, "fold": 3}})))
