"""The run configuration: shipped configs load, every user mistake is a one-line error naming
the key, and `raymb train --print-config` round-trips. Plain Python, no Ray."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from raymb import Config, ConfigError, load_config
from raymb.config import ModelSection, OptimSection, to_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pyproject.toml installs tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[3]
JOB_CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.toml"))

# The keys of a pretrained start, which every family has (raymb.config.model).
START = "init_from, init_allow_missing, init_allow_unexpected, freeze"


def raymb_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raymb.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


# ---------------------------------------------------------------- configs that load


def test_defaults_load() -> None:
    config = load_config(None)
    assert config == Config()
    assert config.accumulation_steps() == 1  # 64 / (2 workers x 32)


def test_there_are_job_configs() -> None:
    assert len(JOB_CONFIGS) >= 3, JOB_CONFIGS


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_config_loads_and_says_how_to_make_its_data(path: Path) -> None:
    config = load_config(path)
    assert config.accumulation_steps() >= 1
    text = path.read_text()
    assert text.startswith("#"), "a header comment says what the config is"
    assert "raymb gen-data" in text, "the header says how to make its data"


# ---------------------------------------------------------------- one-line errors

BAD_OVERRIDES = [
    # (overrides, what the message must contain)
    pytest.param(["foo.bar=1"], "unknown config section [foo]", id="unknown-section"),
    pytest.param(["optim.nope=1"], "optim.nope", id="unknown-key"),
    pytest.param(
        ["train.epochs='5'"], "train.epochs must be an integer (got '5')", id="str-for-int"
    ),
    pytest.param(["train.epochs=five"], "train.epochs must be an integer", id="bare-word-for-int"),
    pytest.param(
        ["train.epochs=true"], "train.epochs must be an integer (got True)", id="bool-for-int"
    ),
    pytest.param(["optim.lr=[0.1]"], "optim.lr must be a number (got [0.1])", id="list-for-float"),
    pytest.param(["scale.use_gpu=1"], "scale.use_gpu must be true or false", id="int-for-bool"),
    pytest.param(["optim.name=nadam"], "optim.name must be one of", id="not-a-choice"),
    pytest.param(["optim.lr=0"], "optim.lr must be > 0", id="lr-zero"),
    pytest.param(["optim.lr=-0.1"], "optim.lr must be > 0", id="lr-negative"),
    pytest.param(["train.epochs=0"], "train.epochs must be > 0", id="epochs-zero"),
    pytest.param(["optim.momentum=1.5"], "optim.momentum must be in [0, 1)", id="momentum"),
    pytest.param(["scale.workers=-1"], "scale.workers must be > 0", id="workers-negative"),
    pytest.param(
        ["scale.workers=[4,2]"],
        "scale.workers must be a number > 0 or [min, max] with 0 < min <= max (got [4, 2])",
        id="workers-range-reversed",
    ),
    # A worker's share of a step is ceil(G / W) = 32 rows: a microbatch of 33 has no rows to take.
    pytest.param(
        ["train.microbatch_size=33"],
        "train.microbatch_size=33 is larger than a worker's share of a step "
        "(train.global_batch_size=64 / scale.workers=2, rounded up: 32): lower "
        "train.microbatch_size to at most 32",
        id="microbatch-larger-than-share",
    ),
    pytest.param(
        ["train.ema_decay=0.99", "train.sync=diloco"],
        'train.sync must be "grad" with train.ema_decay',
        id="ema-under-diloco",
    ),
    # 3 rows a step cannot give each of 4 workers one.
    pytest.param(
        ["train.global_batch_size=3", "scale.workers=4"],
        "train.global_batch_size=3 is smaller than scale.workers=4",
        id="G-smaller-than-W",
    ),
    pytest.param(
        ["train.microbatch_size=128"],
        "train.microbatch_size=128 is larger than train.global_batch_size=64",
        id="microbatch-larger-than-batch",
    ),
    pytest.param(["foo"], "--set 'foo': expected section.key=value", id="set-without-equals"),
    pytest.param(["train=3"], "--set 'train=3': the key must be section.key", id="set-no-section"),
    pytest.param(
        ["a.b.c.d=1"], "--set 'a.b.c.d=1': the key must be section.key", id="set-too-deep-key"
    ),
    pytest.param(["a.b.c=1"], "unknown config section [a]", id="set-unknown-nested"),
    pytest.param(
        ["train.epochs.x=1"], "train.epochs must be an integer (got {'x': 1})", id="set-not-table"
    ),
    pytest.param(["train.early_stopping.patience=0"], "train.early_stopping.patience must be > 0"),
    pytest.param(["train.early_stopping=3"], "train.early_stopping must be a table of keys"),
    pytest.param(["train.memory_budget=lots"], "train.memory_budget must be a size"),
    pytest.param(["train.sync=ring"], "train.sync must be one of 'grad', 'param', 'diloco'"),
    pytest.param(["train.average_every=0"], "train.average_every must be > 0"),
    pytest.param(["fault.rank=2"], "fault.rank must be < scale.workers=2"),
    pytest.param(["outer.momentum=0"], "outer.nesterov must be false when momentum = 0"),
    pytest.param([".x=1"], "--set '.x=1': the key must be section.key", id="set-empty-section"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_OVERRIDES)
def test_bad_config_names_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[train]\nepochs = 0\n", "train.epochs must be > 0"),
        ("[optim]\nlr = 'fast'\n", "optim.lr must be a number (got 'fast')"),
        (
            "[scale]\nworkers = 2.5\n",
            "scale.workers must be an integer or a list of integers (got 2.5)",
        ),
        ("epochs = 3\n", "unknown config section [epochs]"),
        ("train = 3\n", "[train] must be a table"),
        ('[model]\nname = "mlp"\nhidden = [64, 0]\n', "model.hidden must be positive"),
        ("[model]\nhidden = [64, 0]\n", "model.hidden is not a key of model.name = 'linear'"),
    ],
)
def test_bad_config_file_names_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)


# Every message names the value it got, as the config file or --set gave it.
GOT = [
    (
        "model.name=resnet9000",
        "model.name must be linear, mlp, cnn, gpt, transformers or package.module:factory "
        "(got 'resnet9000')",
    ),
    ("optim.lr=-1", "optim.lr must be > 0 (got -1)"),
    ("optim.momentum=1.5", "optim.momentum must be in [0, 1) (got 1.5)"),
    ("optim.gamma=0", "optim.gamma must be in (0, 1] (got 0)"),
    ("optim.weight_decay=-0.5", "optim.weight_decay must be >= 0 (got -0.5)"),
    ("optim.betas=[0.9]", "optim.betas must be two values in [0, 1) (got [0.9])"),
    ("optim.grad_clip=0", "optim.grad_clip must be > 0 (got 0)"),
    ("model.num_classes=1", "model.num_classes must be >= 2 (got 1)"),
    (("model.name=gpt", "model.dropout=1"), "model.dropout must be in [0, 1) (got 1)"),
    (
        ("model.name=mlp", "model.hidden=[64, 0]"),
        "model.hidden must be positive layer widths (got [64, 0])",
    ),
    (
        ("model.name=gpt", "model.width=130"),
        "model.width must be a multiple of model.heads=4 (got 130)",
    ),
    (
        ("model.name=mlp", "model.depth=3"),
        "model.depth is not a key of model.name = 'mlp' (its keys: hidden, dropout, num_classes, "
        f"init, {START})",
    ),
    (
        "model.widths=[8]",
        "model.widths is not a key of model.name = 'linear' (its keys: num_classes, init, "
        f"{START})",
    ),
    (
        ("model.name=my.models:make", "model.hidden=[8]"),
        "model.hidden is not a key of model.name = 'my.models:make' (its keys: num_classes, "
        f"{START})",
    ),
    ("train.epochs=0", "train.epochs must be > 0 (got 0)"),
    ("train.epochs=2.0", "train.epochs must be an integer (got 2.0)"),
    (
        "train.global_batch_size=0",
        'train.global_batch_size must be a positive integer or "all" (got 0)',
    ),
    ("train.sync=ring", "train.sync must be one of 'grad', 'param', 'diloco' (got 'ring')"),
    (
        "train.memory_budget=lots",
        'train.memory_budget must be a size such as "512MiB" or "2GiB" (got \'lots\')',
    ),
    ("train.early_stopping.patience=0", "train.early_stopping.patience must be > 0 (got 0)"),
    ("train.early_stopping=3", "train.early_stopping must be a table of keys (got 3)"),
    ("scale.workers=0", "scale.workers must be > 0 (got 0)"),
    ("scale.max_failures=-1", "scale.max_failures must be >= 0 (got -1)"),
    ("checkpoint.keep=0", "checkpoint.keep must be > 0 (got 0)"),
    ("fault.rank=2", "fault.rank must be < scale.workers=2 (got 2)"),
    ("outer.momentum=0", "outer.nesterov must be false when momentum = 0 (got True)"),
    (
        "run.name=a/b",
        "run.name must be a plain folder name (non-empty, no leading '.', no '/' or '\\', "
        "no control characters) (got 'a/b')",
    ),
    (
        "data.mean=[0.5]",
        "data.mean and data.std must be set together, one value per channel each "
        "(got mean=[0.5], std=None)",
    ),
]


@pytest.mark.parametrize(
    ("override", "message"), GOT, ids=[o if isinstance(o, str) else " ".join(o) for o, _ in GOT]
)
def test_error_names_the_value_it_got(override: str | tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override] if isinstance(override, str) else list(override))
    assert str(info.value) == message


def test_sections_built_in_python_raise_config_errors_too() -> None:
    # raymb.train(Config(...)) and dataclasses.replace check as a config file does.
    with pytest.raises(ConfigError, match=re.escape("optim.lr must be > 0 (got -1)")):
        OptimSection(lr=-1)
    with pytest.raises(ConfigError, match=re.escape("optim.lr must be a number (got 'fast')")):
        dataclasses.replace(Config().optim, lr="fast")
    with pytest.raises(ConfigError, match=re.escape("model.depht is not a key of model.name")):
        ModelSection(depht=3)
    with pytest.raises(ConfigError, match=re.escape("model.hidden must be a list of integers")):
        ModelSection(name="mlp", hidden=3)
    with pytest.raises(ConfigError, match=re.escape("run must be a table of keys (got 3)")):
        dataclasses.replace(Config(), run=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().optim.lr = 1.0


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[train\nepochs = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: not valid TOML")


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(path)


# ---------------------------------------------------------------- what is accepted


def test_all_is_full_batch() -> None:
    config = load_config(None, ["train.global_batch_size=all", "train.microbatch_size=16"])
    assert config.train.global_batch_size == "all"
    assert config.microbatch() == 16
    assert config.accumulation_steps() is None  # depends on the data


def test_uneven_splits_are_accepted() -> None:
    # G = 64, W = 2: shares of 32, cut into microbatches of 5: 6 of 5 and one of 2, k = 7.
    config = load_config(None, ["train.microbatch_size=5"])
    assert config.accumulation_steps() == 7
    # G = 10, W = 4: shares of 3, 3, 2, 2 rows; m = 2: k = ceil(3 / 2) = 2 on the largest.
    config = load_config(
        None, ["train.global_batch_size=10", "scale.workers=4", "train.microbatch_size=2"]
    )
    assert config.accumulation_steps() == 2
    # G = 10, W = 4, m unset: m = the largest share, 3 rows, one microbatch each.
    config = load_config(None, ["train.global_batch_size=10", "scale.workers=4"])
    assert (config.microbatch(), config.accumulation_steps()) == (3, 1)


def test_full_batch_and_lbfgs_need_no_more_keys() -> None:
    config = load_config(None, ["train.global_batch_size=all", "optim.name=lbfgs"])
    assert config.microbatch() is None  # the share, or "auto": raymb.driver.sizing
    assert config.optim.lr == 1.0  # torch's L-BFGS default, not SGD's 0.05
    assert load_config(None).optim.lr == 0.05
    assert (
        load_config(
            None, ["optim.name=lbfgs", "optim.lr=0.5", "train.global_batch_size=all"]
        ).optim.lr
        == 0.5
    )


def test_accumulation_steps() -> None:
    # G = 96 samples per step, W = 3 workers, m = 4 per forward: k = 96 / (3 x 4) = 8.
    config = load_config(
        None, ["train.global_batch_size=96", "scale.workers=3", "train.microbatch_size=4"]
    )
    assert config.accumulation_steps() == 8


def test_int_is_accepted_for_a_float_key() -> None:
    config = load_config(None, ["optim.lr=1", "optim.grad_clip=2"])
    assert config.optim.lr == 1.0 and type(config.optim.lr) is float
    assert config.optim.grad_clip == 2.0 and type(config.optim.grad_clip) is float


@pytest.mark.parametrize("unset", ["none", '""'])
def test_set_none_unsets_an_optional_key(unset: str) -> None:
    assert load_config(None).data.val is not None
    assert load_config(None, [f"data.val={unset}"]).data.val is None
    assert load_config(None, [f"optim.grad_clip={unset}"]).optim.grad_clip is None


def test_data_train_without_val_leaves_val_unset(tmp_path: Path) -> None:
    # Never validate a user's model on the demo data.
    assert load_config(None, ["data.train=mine/train"]).data.val is None
    config = load_config(None, ["data.train=mine/train", "data.val=mine/val"])
    assert config.data.val == "mine/val"
    path = tmp_path / "c.toml"
    path.write_text('[data]\ntrain = "mine/train"\n')
    assert load_config(path).data.val is None


def test_no_val_set_makes_train_loss_the_default_metric() -> None:
    # The default metric, val_loss, needs a validation set: without one the best checkpoint
    # is the one of lowest training loss, unless checkpoint.metric says otherwise.
    assert load_config(None).checkpoint.metric == "val_loss"
    assert load_config(None, ["data.val=none"]).checkpoint.metric == "train_loss"
    assert load_config(None, ["data.train=mine/train"]).checkpoint.metric == "train_loss"
    both = ["data.train=mine/train", "data.val=mine/val"]
    assert load_config(None, both).checkpoint.metric == "val_loss"
    # Set explicitly, it stays (raymb.driver.run refuses a val_* metric without data.val).
    explicit = load_config(None, ["data.train=mine/train", "checkpoint.metric=val_loss"])
    assert explicit.checkpoint.metric == "val_loss"


def test_print_config_says_why_the_metric_is_train_loss() -> None:
    text = to_toml(load_config(None, ["data.train=mine/train"]))
    assert (
        '\nmetric = "train_loss"  # no data.val: the default val_loss needs a validation set\n'
        in text
    )
    assert '\nmetric = "val_loss"\n' in to_toml(load_config(None))


def test_overrides_apply_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[train]\nepochs = 3\nseed = 7\n")
    config = load_config(path, ["train.epochs=9"])
    assert (config.train.epochs, config.train.seed) == (9, 7)


# ---------------------------------------------------------------- --print-config


ROUND_TRIP = [
    pytest.param(None, [], id="defaults"),
    *[pytest.param(str(p), [], id=p.name) for p in JOB_CONFIGS],
    pytest.param(
        None,
        [
            "train.global_batch_size=all",
            "train.microbatch_size=8",
            "optim.grad_clip=1.5",
            "model.num_classes=4",
            "data.train=x/train",
            'data.features=["a", "b"]',
            "optim.lr=1e-5",
            'run.name=odd "name"',
            "checkpoint.every_steps=7",
            "scale.cpus_per_worker=0.5",
        ],
        id="every-kind-of-value",
    ),
]


@pytest.mark.parametrize(("config_path", "overrides"), ROUND_TRIP)
def test_print_config_round_trips(
    tmp_path: Path, config_path: str | None, overrides: list[str]
) -> None:
    expected = load_config(config_path, overrides)
    args = ["train", "--print-config"] + (["--config", config_path] if config_path else [])
    for item in overrides:
        args += ["--set", item]
    proc = raymb_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == to_toml(expected)

    parsed = tomllib.loads(proc.stdout)  # commented unset keys are TOML comments
    assert parsed.keys() == {f.name for f in dataclasses.fields(Config)}
    printed = tmp_path / "printed.toml"
    printed.write_text(proc.stdout)
    assert load_config(printed) == expected


def test_print_config_shows_every_key() -> None:
    text = raymb_cli("train", "--print-config").stdout
    for section in dataclasses.fields(Config):
        assert f"[{section.name}]" in text
        for key in dataclasses.fields(section.default_factory()):
            if dataclasses.is_dataclass(getattr(section.default_factory(), key.name)):
                assert f"\n[{section.name}.{key.name}]\n" in text
                continue
            assert f"\n{key.name} = " in text or f"\n# {key.name} = (unset)" in text, key.name


# ---------------------------------------------------------------- the CLI


def test_cli_config_error_is_one_line_and_exits_2() -> None:
    proc = raymb_cli("train", "--set", "foo")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["raymb: error: --set 'foo': expected section.key=value"]


def test_cli_missing_config_file() -> None:
    proc = raymb_cli("train", "--config", "no/such.toml", "--print-config")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["raymb: error: config file not found: no/such.toml"]


def test_cli_train_help_mentions_every_flag() -> None:
    proc = raymb_cli("train", "--help")
    assert proc.returncode == 0
    for flag in ("--config", "--set", "--address", "--print-config"):
        assert flag in proc.stdout
