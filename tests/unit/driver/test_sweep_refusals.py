"""Issue 34, the sweep's part: a sweep that cannot run is refused in one line, exit 2, under
2 s, before Ray starts and with nothing written (huge grids and draws, an object-store
storage path, a resumed sweep whose space or base config changed, ASHA's grace beyond the
epochs, a bad point anywhere in the grid, val_accuracy on regression data, too many folds);
what a sweep leaves is never mistaken for a finished one (a trial's run that trained to its
end, an interrupted sweep's outputs) and a sweep that failed before any trial leaves no
folder. No Ray session: the trial's finished-check runs on run folders made by hand."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import assert_refused

from raymb import ConfigError
from raymb.config.tune import MAX_TRIALS, repeat_seeds
from raymb.load import load_sweep
from raymb.rundir import sweep as out

BASE = """
[run]
name = "sweep"
[data]
train = "data/train"
val = "data/val"
[train]
global_batch_size = 4
epochs = 2
[scale]
workers = 1
"""


@pytest.fixture(scope="module")
def rows100(tmp_path_factory) -> Path:
    """A linear regression set: 100 rows (and a validation split), float labels."""
    from raymb.data.synthetic import generate

    data = tmp_path_factory.mktemp("rows100")
    generate("linear", data, rows=100, shards=1, seed=0)
    return data


@pytest.fixture
def folder(tmp_path, rows100) -> Path:
    """A working folder with data/ (a copy of rows100's files) for a sweep.toml."""
    import shutil

    shutil.copytree(rows100, tmp_path / "data")
    return tmp_path


def _write(folder: Path, tune: str, base: str = BASE) -> Path:
    path = folder / "sweep.toml"
    path.write_text(base + "\n" + tune)
    return path


def _values(n: int) -> str:
    return "[" + ", ".join(f"{(i + 1) / 1000:g}" for i in range(n)) + "]"


# ---------------------------------------------------------------- huge sweeps


@pytest.mark.parametrize(
    "tune, words",
    [
        (  # 10^9 points: counted, never built
            '[tune.space]\n"optim.lr" = {v}\n"optim.weight_decay" = {v}\n"optim.momentum" = {v}',
            ["1,000,000,000 runs", "tune.max_trials=10,000"],
        ),
        ('[tune]\nsamples = 1000000\n[tune.space]\n"optim.lr" = [0.1]', ["1,000,000 runs"]),
        (  # 100,000 points
            '[tune.space]\n"optim.lr" = {v}\n"optim.weight_decay" = [0.1, 0.2, 0.3, 0.4, 0.5,'
            " 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0,"
            ' 2.1, 2.2, 2.3, 2.4, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0]\n"train.epochs" = {v}',
            ["30,000,000 runs"],
        ),
        (
            '[tune]\nsearch = "random"\nsamples = 20000\n[tune.space]\n'
            '"optim.lr" = { loguniform = [0.001, 0.1] }',
            ["20,000 runs", "samples=20000"],
        ),
        (  # folds are runs too
            '[tune]\ncv_folds = 20\n[tune.space]\n"optim.lr" = {v}',
            ["20,000 runs", "cv_folds=20"],
        ),
        ('[tune]\nmax_trials = 2\n[tune.space]\n"optim.lr" = [0.1, 0.2, 0.3]', ["3 runs"]),
    ],
)
@pytest.mark.parametrize("print_config", [False, True])
def test_a_huge_sweep_is_counted_and_refused_at_once(folder, tune, words, print_config):
    _write(folder, tune.replace("{v}", _values(1000)))
    args = ["tune", "--config", "sweep.toml"] + (["--print-config"] if print_config else [])
    assert_refused(args, folder, *words, "tune.max_trials")


def test_max_trials_lets_a_larger_sweep_through(folder):
    path = _write(folder, '[tune]\nmax_trials = 3\n[tune.space]\n"optim.lr" = [0.1, 0.2, 0.3]')
    assert len(load_sweep(path).grid()) == 3
    with pytest.raises(ConfigError, match="tune.max_trials=2"):
        load_sweep(path, ["tune.max_trials=2"])
    assert MAX_TRIALS == 10_000


def test_the_repeats_seeds_are_drawn_in_linear_time():
    start = time.monotonic()
    seeds = repeat_seeds(5, 300_000)
    assert time.monotonic() - start < 5.0
    assert len(set(seeds)) == 300_000 and seeds[0] == 5
    assert seeds[:3] == repeat_seeds(5, 3)  # the same draws as before, only faster


# ---------------------------------------------------------------- object stores


@pytest.mark.parametrize("storage", ["gs://bucket/sweeps", "s3://bucket/sweeps", "file:///tmp/x"])
@pytest.mark.parametrize("print_config", [False, True])
def test_an_object_store_is_refused_from_its_scheme(folder, storage, print_config):
    _write(folder, '[tune.space]\n"optim.lr" = [0.1]')
    args = ["tune", "--config", "sweep.toml", "--set", f"run.storage_path={storage}"]
    # No endpoint is reachable: a contacted store would hang or fail another way.
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "GOOGLE_CLOUD_PROJECT": "none"}
    args += ["--print-config"] if print_config else []
    assert_refused(args, folder, "run.storage_path", storage, "object store", env=env)


# ---------------------------------------------------------------- a resumed sweep


def _started(folder: Path, monkeypatch, tune: str) -> Path:
    """A sweep folder as a started sweep leaves it: its sweep.json (and a tuner.pkl)."""
    monkeypatch.chdir(folder)
    sweep = load_sweep(_write(folder, tune))
    sweep_dir = folder / "runs" / "sweep"
    out.write_record(sweep, sweep_dir)
    (sweep_dir / "tuner.pkl").write_bytes(b"not read")
    return sweep_dir


@pytest.mark.parametrize(
    "now, words",
    [
        (
            '[tune.space]\n"optim.lr" = [0.1, 0.2]\n"optim.weight_decay" = [0.0, 0.1]',
            ['tune.space."optim.weight_decay" = (not set)', "[0.0, 0.1]"],
        ),
        (
            '[tune.space]\n"optim.lr" = [0.1, 0.3]',
            ['tune.space."optim.lr" = [0.1, 0.2]', "[0.1, 0.3]"],
        ),
        ('[tune]\nsamples = 2\n[tune.space]\n"optim.lr" = [0.1, 0.2]', ["tune.samples = 1", "2"]),
    ],
)
def test_a_resumed_sweep_with_another_space_is_refused(folder, monkeypatch, now, words):
    sweep_dir = _started(folder, monkeypatch, '[tune.space]\n"optim.lr" = [0.1, 0.2]')
    _write(folder, now)
    line = assert_refused(["tune", "--config", "sweep.toml"], folder, *words)
    assert str(sweep_dir) in line and "use another run.name" in line


def test_a_resumed_sweep_with_an_edited_base_config_is_refused(folder, monkeypatch):
    _started(folder, monkeypatch, '[tune.space]\n"optim.lr" = [0.1, 0.2]')
    _write(
        folder, '[tune.space]\n"optim.lr" = [0.1, 0.2]', BASE.replace("epochs = 2", "epochs = 5")
    )
    assert_refused(
        ["tune", "--config", "sweep.toml"], folder, "train.epochs = 2", "5", "another run.name"
    )
    # --set counts as an edit too.
    _write(folder, '[tune.space]\n"optim.lr" = [0.1, 0.2]')
    assert_refused(
        ["tune", "--config", "sweep.toml", "--set", "optim.name=adam"], folder, "optim.name"
    )


def test_the_same_sweep_matches_its_record_and_tracking_may_change(folder, monkeypatch):
    sweep_dir = _started(folder, monkeypatch, '[tune.space]\n"optim.lr" = [0.1, 0.2]')
    path = folder / "sweep.toml"
    out.check_record(load_sweep(path), sweep_dir)
    # What the trials do not depend on may change on resume.
    out.check_record(load_sweep(path, ["tune.max_concurrent=1", "log.tensorboard=true"]), sweep_dir)
    monkeypatch.chdir(folder / "data")  # the same data through another relative path
    out.check_record(load_sweep(path, ["data.train=train", "data.val=val"]), sweep_dir)
    with pytest.raises(ConfigError, match="data.train"):
        out.check_record(load_sweep(path, ["data.train=val"]), sweep_dir)


def test_a_folder_with_only_a_sweep_record_is_a_sweep(folder, monkeypatch):
    from raymb.driver.tune_preflight import check_sweep_dir

    sweep_dir = _started(folder, monkeypatch, '[tune.space]\n"optim.lr" = [0.1]')
    (sweep_dir / "tuner.pkl").unlink()  # killed before Tune wrote its own
    assert check_sweep_dir(load_sweep(folder / "sweep.toml")).resolve() == sweep_dir.resolve()
    (sweep_dir / out.SWEEP_FILE).unlink()
    (sweep_dir / "notes.txt").write_text("mine")
    assert_refused(["tune", "--config", "sweep.toml"], folder, "is not a sweep")


# ---------------------------------------------------------------- config and data checks


@pytest.mark.parametrize(
    "tune, words",
    [
        (
            '[tune]\nscheduler = "asha"\ngrace_epochs = 3\n[tune.space]\n"optim.lr" = [0.1]',
            ["tune.grace_epochs=3", "train.epochs=2"],
        ),
        ('[tune]\ncv_folds = 1000000\n[tune.space]\n"optim.lr" = [0.1]', ["tune.cv_folds", "1000"]),
        (
            '[tune]\ncv_folds = 101\n[tune.space]\n"optim.lr" = [0.1]',
            ["tune.cv_folds=101", "100 rows"],
        ),
        (
            '[tune]\nmetric = "val_accuracy"\n[tune.space]\n"optim.lr" = [0.1, 0.2]',
            ["tune.metric='val_accuracy'", "integer (class) labels"],
        ),
        (  # the 65th distinct point is the bad one: every point is checked
            '[tune.space]\n"train.global_batch_size" = ' + str([*range(1, 65), 200]),
            ["train.global_batch_size=200", "data.train"],
        ),
    ],
)
def test_a_sweep_that_cannot_run_is_refused_before_ray(folder, tune, words):
    _write(folder, tune)
    assert_refused(["tune", "--config", "sweep.toml"], folder, *words)


def test_the_data_checks_run_once_per_distinct_point(folder, monkeypatch):
    from raymb.driver import preflight, tune_preflight

    monkeypatch.chdir(folder)
    calls = []
    real = preflight.prepare
    monkeypatch.setattr(preflight, "prepare", lambda config: calls.append(1) or real(config))
    path = _write(
        folder,
        '[tune.space]\n"optim.lr" = {v}\n"train.epochs" = [1, 2]'.replace("{v}", _values(100)),
    )
    sweep = load_sweep(path)
    tune_preflight.check_data(sweep, folder / "runs" / "sweep")
    assert len(calls) == 2  # 200 points, 2 distinct but for optim.*


# ---------------------------------------------------------------- what a sweep leaves


def _run_dir(root: Path, status: str | None, *, summary_after: bool = True) -> Path:
    """A trial's run folder as a driver leaves it: status.json (marked at `status`) and,
    written before or after that mark, summary.json."""
    from raymb.rundir.runs import mark
    from raymb.storage import resolve

    run_dir = root / "trial-000"
    run_dir.mkdir(parents=True)
    summary = {"val_loss": 0.25, "train_loss": 0.5, "steps": 12, "stopped_early": False}
    if not summary_after:
        (run_dir / "summary.json").write_text(json.dumps(summary))
        time.sleep(0.02)
    if status is not None:
        mark(resolve(str(run_dir)), status)
    if summary_after:
        time.sleep(0.02)
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.mark.parametrize(
    "status, summary_after, finished",
    [
        ("finished", False, True),
        ("stopped early", False, True),
        # Killed between summary.json and the last mark: it trained to its end.
        ("running", True, True),
        # Marked running again after an older attempt's summary: it did not.
        ("running", False, False),
        ("stopped", False, False),
        ("interrupted", False, False),
        ("failed", False, False),
        (None, True, False),
    ],
)
def test_a_trial_that_trained_to_its_end_is_not_started_again(
    tmp_path, status, summary_after, finished
):
    run_dir = _run_dir(tmp_path, status, summary_after=summary_after)
    summary = out.finished_summary(run_dir)
    assert (summary is not None) == finished
    if finished:
        assert summary["val_loss"] == 0.25 and summary["steps"] == 12
    (run_dir / "summary.json").unlink()
    assert out.finished_summary(run_dir) is None  # no summary: nothing to report


def test_an_interrupted_sweep_writes_no_best_toml(tmp_path, monkeypatch, folder):
    monkeypatch.chdir(folder)
    sweep = load_sweep(_write(folder, '[tune.space]\n"optim.lr" = [0.1, 0.2, 0.3]'))
    (tmp_path / "best.toml").write_text("# an older end's\n")
    rows = [
        {"trial": "trial-000", "optim.lr": 0.1, "val_loss": 0.2, "steps": 8, "status": "finished"},
        {
            "trial": "trial-001",
            "optim.lr": 0.2,
            "val_loss": 0.3,
            "steps": 3,
            "status": "interrupted",
        },
        {
            "trial": "trial-002",
            "optim.lr": 0.3,
            "val_loss": None,
            "steps": None,
            "status": "not started",
        },
    ]
    for r in rows:
        r["run_dir"] = str(tmp_path / "trials" / r["trial"])
    result = out.write_outputs(sweep, rows, tmp_path, interrupted=True)
    assert result.status == "interrupted" and result.best_trial is None
    assert not (tmp_path / "best.toml").exists()
    saved = json.loads((tmp_path / "tune.json").read_text())
    assert saved["status"] == "interrupted" and saved["best_trial"] is None
    assert (saved["finished"], saved["interrupted"], saved["not_started"]) == (1, 1, 1)
    assert "interrupted" in (tmp_path / "trials.csv").read_text()
    finished = out.write_outputs(sweep, rows[:1], tmp_path)
    assert finished.status == "finished" and (tmp_path / "best.toml").exists()
    assert json.loads((tmp_path / "tune.json").read_text())["status"] == "finished"


def test_a_sweep_that_fails_before_any_trial_leaves_no_folder(folder, monkeypatch):
    monkeypatch.chdir(folder)
    sweep = load_sweep(_write(folder, '[tune.space]\n"optim.lr" = [0.1]'))
    sweep_dir = folder / "runs" / "sweep"

    def start() -> None:  # as raymb.driver.tune.run_sweep does, until Ray fails
        with out.removed_unless_started(sweep_dir):
            out.write_record(sweep, sweep_dir)
            (sweep_dir / "logs").mkdir(exist_ok=True)
            (sweep_dir / "logs" / "ray.log").write_text("Ray's lines\n")
            (sweep_dir / "tuner.pkl").write_bytes(b"")
            raise RuntimeError("Ray did not start")

    with pytest.raises(RuntimeError):
        start()
    assert not sweep_dir.exists() and (folder / "runs").is_dir()
    sweep_dir.mkdir()  # an empty folder stays, empty
    with pytest.raises(KeyboardInterrupt):
        with out.removed_unless_started(sweep_dir):
            out.write_record(sweep, sweep_dir)
            raise KeyboardInterrupt
    assert sweep_dir.is_dir() and not any(sweep_dir.iterdir())
    # A sweep whose trials had started keeps everything.
    (sweep_dir / "trials" / "trial-000").mkdir(parents=True)
    with pytest.raises(RuntimeError):
        start()
    assert (sweep_dir / "trials" / "trial-000").is_dir() and (sweep_dir / out.SWEEP_FILE).exists()


def test_the_cli_says_an_interrupted_sweep_resumes_and_exits_130(folder, monkeypatch, capsys):
    from raymb.cli import main
    from raymb.driver import tune_preflight

    monkeypatch.chdir(folder)
    _write(folder, '[tune.space]\n"optim.lr" = [0.1, 0.2]')
    result = out.TuneResult(
        path=str(folder / "runs" / "sweep"),
        trials=[
            {"trial": "trial-000", "status": "finished"},
            {"trial": "trial-001", "status": "interrupted"},
        ],
        best_trial=None,
        best_values={},
        best_metric=None,
        best_config=None,
        metric="val_loss",
        mode="min",
        status="interrupted",
    )
    monkeypatch.setattr(tune_preflight, "tune", lambda sweep, **kw: result)
    assert main(["tune", "--config", "sweep.toml"]) == 130
    err = capsys.readouterr().err
    assert "interrupted with 1 of 2 trials finished" in err and "same command" in err
