"""Issue 20, the config's part: a run name is a plain folder name (so a run never lands in, or
deletes, the storage path's parent), a config file that cannot be read is one line, no float
setting takes inf or nan, a seed or epoch count stays within what torch and the step counter
take, and --print-config is TOML that reads back the same whatever a string holds. Plain
Python, no Ray: every refusal comes before Ray is imported."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import assert_refused

from raymb import ConfigError, load_config
from raymb.cli import main
from raymb.config import (
    MAX_EPOCHS,
    MAX_SEED,
    MAX_STEPS,
    Config,
    RunSection,
    json_schema,
    parse_bytes,
    to_toml,
)
from raymb.core.order import epoch_seed

if sys.version_info >= (3, 11):
    import tomllib
else:  # pyproject.toml installs tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[3]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and len(message.splitlines()) == 1, message
    return message


# ---------------------------------------------------------------- item 1: run.name


@pytest.mark.parametrize("name", ["..", ".", "a/..", "x\ny"])
def test_a_sibling_of_the_storage_path_survives_every_bad_name(tmp_path: Path, name: str) -> None:
    runs = tmp_path / "runs"
    (runs / "old-run").mkdir(parents=True)
    (runs / "old-run" / "run.json").write_text("{}\n")
    (tmp_path / "sibling").mkdir()
    (tmp_path / "sibling" / "keep.txt").write_text("precious\n")
    args = ["train", "--set", "run.storage_path=runs", "--set", f"run.name={name}"]
    line = assert_refused(args, tmp_path, "run.name", "plain folder name", repr(name))
    assert line.endswith(f"(got {name!r})")
    assert (tmp_path / "sibling" / "keep.txt").read_text() == "precious\n"
    assert (runs / "old-run" / "run.json").read_text() == "{}\n"


BAD_NAMES = [
    "",
    ".",
    "..",
    ".hidden",
    ".raymb-tmp-123",
    "a/b",
    "a/..",
    "/abs",
    "a\\b",
    "..\\up",
    "x\ny",
    "tab\there",
    "cr\rhere",
    "nul\x00byte",
    "del\x7f",
    "esc\x1b[31m",
    "nel\x85",
    "line\u2028separator",
    "zero\u200bwidth",
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n) for n in BAD_NAMES])
def test_run_name_must_be_a_plain_name(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        RunSection(name=name)
    message = one_line(info)
    assert message == (
        "run.name must be a plain folder name (non-empty, no leading '.', no '/' or '\\', "
        f"no control characters) (got {name!r})"
    )
    # The same through a config file's [run] table and through dataclasses.replace.
    with pytest.raises(ConfigError, match="run.name must be a plain folder name"):
        Config.from_dict({"run": {"name": name}})
    with pytest.raises(ConfigError, match="run.name must be a plain folder name"):
        dataclasses.replace(Config().run, name=name)


@pytest.mark.parametrize(
    "name", ["default", "my-run_2.v1", "run 1", 'odd "name"', "ünïcödé-实验", "a..b", "x."]
)
def test_plain_names_stay_valid(name: str) -> None:
    assert RunSection(name=name).name == name
    assert load_config(None, [f"run.name={name}"]).run.name == name


def test_a_name_longer_than_a_folder_name_may_be_is_refused() -> None:
    assert RunSection(name="a" * 255).name == "a" * 255
    with pytest.raises(ConfigError) as info:
        RunSection(name="é" * 128)  # 256 bytes in UTF-8
    assert one_line(info).startswith("run.name must be at most 255 bytes long, not 256")


# ---------------------------------------------------------------- item 9: one line, no traceback


def _file(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda cwd: (cwd / name).write_bytes(content)


def _folder(name: str) -> Callable[[Path], None]:
    return lambda cwd: (cwd / name).mkdir()


def _nothing(cwd: Path) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class Case:
    args: list[str]
    words: tuple[str, ...]
    setup: Callable[[Path], None] = _nothing


def _set(*items: str) -> list[str]:
    return ["train", *(a for item in items for a in ("--set", item))]


BATTERY = {
    "config-not-utf8": Case(
        ["train", "--config", "latin1.toml"],
        ("config file latin1.toml is not UTF-8 text", "byte 26: 0xe9"),
        _file("latin1.toml", b'[run]\nname = "caf\xc3\xa9"\n# caf\xe9\n'),
    ),
    "config-is-a-directory": Case(
        ["train", "--config", "conf.toml"],
        ("config file conf.toml is a directory",),
        _folder("conf.toml"),
    ),
    "config-missing": Case(
        ["train", "--config", "nope.toml"], ("config file not found: nope.toml",)
    ),
    "config-inf-in-file": Case(
        ["train", "--config", "inf.toml"],
        ("optim.lr must be a finite number > 0 (got inf)",),
        _file("inf.toml", b"[optim]\nlr = inf\n"),
    ),
    "memory-budget-inf": Case(
        _set("train.memory_budget=infGiB"), ("train.memory_budget", "(got 'infGiB')")
    ),
    "memory-budget-overflows-a-float": Case(
        _set("train.memory_budget=1e400GiB"), ("train.memory_budget", "(got '1e400GiB')")
    ),
    "lr-inf": Case(_set("optim.lr=inf"), ("optim.lr must be a finite number > 0 (got inf)",)),
    "lr-nan": Case(_set("optim.lr=nan"), ("optim.lr must be a finite number > 0 (got nan)",)),
    "weight-decay-inf": Case(
        _set("optim.weight_decay=inf"), ("optim.weight_decay must be a finite number >= 0",)
    ),
    "grad-clip-inf": Case(_set("optim.grad_clip=inf"), ("optim.grad_clip must be a finite",)),
    "outer-lr-inf": Case(_set("outer.lr=inf"), ("outer.lr must be a finite number > 0",)),
    "data-scale-inf": Case(_set("data.scale=inf"), ("data.scale must be a finite number > 0",)),
    "data-mean-inf": Case(
        _set("data.mean=[0.5, -inf]", "data.std=[1.0, 1.0]"),
        ("data.mean must be a list of finite numbers (got [0.5, -inf])",),
    ),
    "data-std-nan": Case(
        _set("data.mean=[0.5]", "data.std=[nan]"),
        ("data.std must be a list of finite numbers (got [nan])",),
    ),
    "cpus-per-worker-inf": Case(
        _set("scale.cpus_per_worker=inf"), ("scale.cpus_per_worker must be a finite number > 0",)
    ),
    "min-delta-inf": Case(
        _set("train.early_stopping.min_delta=inf"),
        ("train.early_stopping.min_delta must be a finite number >= 0",),
    ),
    "seed-negative": Case(_set("train.seed=-1"), ("train.seed must be >= 0 (got -1)",)),
    "seed-too-large": Case(
        _set(f"train.seed={2**64}"), (f"train.seed must be <= 9007199254740991 (got {2**64})",)
    ),
    "epochs-too-many": Case(
        _set(f"train.epochs={10**30}"), (f"train.epochs must be <= 2147483647 (got {10**30})",)
    ),
    "max-steps-past-int64": Case(
        _set(f"train.max_steps={2**63}"),
        (f"train.max_steps must be <= 9223372036854775807 (got {2**63})",),
    ),
    "unknown-key-with-a-newline": Case(_set("run.na\nme=x"), ("unknown config key run.'na\\nme'",)),
}


@pytest.mark.parametrize("case", BATTERY.values(), ids=BATTERY.keys())
def test_refused_in_one_line(tmp_path: Path, case: Case) -> None:
    case.setup(tmp_path)
    assert_refused(case.args, tmp_path, *case.words)


def test_a_config_file_that_cannot_be_read_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    with pytest.raises(ConfigError) as info:
        load_config(folder)
    assert one_line(info) == f"config file {folder} is a directory, not a TOML file"
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"# \xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(latin1)
    assert (
        one_line(info) == f"config file {latin1} is not UTF-8 text (byte 2: 0xe9); save it as UTF-8"
    )
    # UTF-8 is read as UTF-8 whatever the locale says.
    utf8 = tmp_path / "utf8.toml"
    utf8.write_bytes('[run]\nname = "café"\n'.encode())
    assert load_config(utf8).run.name == "café"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_config_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "secret.toml"
    path.write_text("[train]\nepochs = 3\n")
    path.chmod(0)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert one_line(info) == f"config file {path} cannot be read: Permission denied"


@pytest.mark.parametrize(
    "key",
    [
        "optim.lr",
        "optim.weight_decay",
        "optim.min_lr",
        "optim.grad_clip",
        "optim.momentum",
        "optim.gamma",
        "outer.lr",
        "outer.momentum",
        "data.scale",
        "scale.cpus_per_worker",
        "checkpoint.min_interval_s",
        "train.early_stopping.min_delta",
        "model.dropout",
    ],
)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_no_float_setting_takes_inf_or_nan(key: str, value: str) -> None:
    family = ["model.name=gpt"] if key == "model.dropout" else []  # the gpt's key
    with pytest.raises(ConfigError) as info:
        load_config(None, [*family, f"{key}={value}"])
    message = one_line(info)
    assert message.startswith(f"{key} must be ") and message.endswith(f"(got {value})"), message


def test_every_float_field_is_checked_finite() -> None:
    # Independent of the list above: every float the schema knows refuses inf.
    def floats(ref: dict, prefix: str) -> list[str]:
        found = []
        for key, prop in ref["properties"].items():
            kinds = [prop, *prop.get("anyOf", [])]
            if "$ref" in prop or any("$ref" in k for k in kinds):
                continue
            if any(k.get("type") == "number" for k in kinds):
                found.append(f"{prefix}.{key}")
        return found

    schema = json_schema()
    defs = schema["$defs"]
    sections = {f.name: type(f.default_factory()).__name__ for f in dataclasses.fields(Config)}
    keys = [(k, []) for name, ref in sections.items() for k in floats(defs[ref], name)]
    keys += [(k, []) for k in floats(defs["EarlyStopping"], "train.early_stopping")]
    for form in schema["properties"]["model"]["oneOf"]:  # each model family's own keys
        ref = defs[form["$ref"].split("/")[-1]]
        name = ref["properties"]["name"].get("const", "my.models:make")
        keys += [(k, [f"model.name={name}"]) for k in floats(ref, "model")]
    assert {"optim.lr", "scale.cpus_per_worker", "model.dropout"} <= {k for k, _ in keys}
    for key, family in keys:
        with pytest.raises(ConfigError, match=r"\(got inf\)$"):
            load_config(None, [*family, f"{key}=inf"])


def test_parse_bytes_takes_only_finite_positive_sizes() -> None:
    assert parse_bytes("512MiB") == 512 * 1024 * 1024
    assert parse_bytes("1.5KiB") == 1536
    assert parse_bytes("2GB") == 2_000_000_000
    for text in ("infGiB", "inf", "-infGiB", "nanGiB", "1e400GiB", "1e300GiB", "0GiB", "-1MiB"):
        assert parse_bytes(text) is None, text


def test_seed_and_epoch_bounds_are_what_torch_and_the_step_counter_take() -> None:
    # The largest seed: the worker seeds torch with seed * 1000 + rank, an epoch's order
    # with epoch_seed(seed, epoch); both stay in what torch takes (at most 2**64 - 1).
    assert MAX_SEED == 9_007_199_254_740_991 and MAX_EPOCHS == 2_147_483_647
    assert MAX_STEPS == 9_223_372_036_854_775_807
    torch.manual_seed(MAX_SEED * 1000 + 999)
    torch.Generator().manual_seed(epoch_seed(MAX_SEED, MAX_EPOCHS))
    assert float(MAX_SEED) == MAX_SEED  # exact in summary.json and as a TensorBoard number
    assert MAX_EPOCHS * 2**32 < 2**63  # epochs x steps per epoch fits an int64
    config = load_config(
        None,
        [f"train.seed={MAX_SEED}", f"train.epochs={MAX_EPOCHS}", f"train.max_steps={MAX_STEPS}"],
    )
    assert (config.train.seed, config.train.epochs, config.train.max_steps) == (
        MAX_SEED,
        MAX_EPOCHS,
        MAX_STEPS,
    )
    assert load_config(None, ["train.seed=0"]).train.seed == 0
    # The schema an editor checks against says the same bounds.
    train = json_schema()["$defs"]["TrainSection"]["properties"]
    assert (train["seed"]["minimum"], train["seed"]["maximum"]) == (0, MAX_SEED)
    assert (train["epochs"]["exclusiveMinimum"], train["epochs"]["maximum"]) == (0, MAX_EPOCHS)
    # Below the limits, the bounds read as before.
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.epochs=0"])
    assert one_line(info) == "train.epochs must be > 0 (got 0)"


def test_a_key_with_a_newline_is_named_on_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["run.na\nme=x"])
    assert one_line(info).startswith("unknown config key run.'na\\nme'; known in [run]: name")
    path = tmp_path / "key.toml"
    path.write_text('["tr\\nain"]\nepochs = 3\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert one_line(info).startswith("unknown config section ['tr\\nain']; known: run, storage")


# ---------------------------------------------------------------- --print-config escapes


AWKWARD = 'a\nb\tc\rd\x00e\x1bf\x7fg\x08h\x0ci"j\\k\u2028l é\U000e0001'


def test_to_toml_escapes_control_characters_and_reads_back_the_same() -> None:
    config = load_config(
        None,
        [
            f"run.storage_path={AWKWARD}",
            f"data.train={AWKWARD}",
            f"data.features={[AWKWARD, 'x']!r}".replace("'", '"'),
        ],
    )
    assert config.data.train == AWKWARD  # the override took the raw text
    text = to_toml(config)
    assert not any(c in text for c in "\r\x00\x1b\x7f\x08\x0c\t")
    parsed = tomllib.loads(text)
    assert parsed["run"]["storage_path"] == AWKWARD
    assert parsed["data"]["train"] == AWKWARD
    assert Config.from_dict(parsed) == config
    # One line per key: the value with the newline did not split its line.
    assert [line for line in text.splitlines() if line.startswith("storage_path = ")] == [
        'storage_path = "a\\nb\\tc\\rd\\u0000e\\u001Bf\\u007Fg\\bh\\fi'
        '\\"j\\\\k\\u2028l é\\U000E0001"'
    ]


def test_print_config_with_a_newline_is_toml_that_reads_back(capsys) -> None:
    overrides = ["data.train=x\ny/train", "run.storage_path=runs\there"]
    argv = ["train", "--print-config"] + [a for o in overrides for a in ("--set", o)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert Config.from_dict(tomllib.loads(out)) == load_config(None, overrides)


def test_a_string_toml_cannot_hold_is_one_line() -> None:
    config = load_config(None, ["data.train=caf\udce9"])  # a byte that was not UTF-8 in argv
    with pytest.raises(ConfigError) as info:
        to_toml(config)
    assert one_line(info) == "data.train='caf\\udce9' cannot be written as TOML: not UTF-8 text"


# ---------------------------------------------------------------- jobs/train.py


def _job_main():
    spec = importlib.util.spec_from_file_location("raymb_job_train", REPO / "jobs" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


JOB = _job_main()
LINEAR = str(REPO / "jobs" / "configs" / "linear.toml")


def _job_error(capsys, *args: str) -> str:
    assert JOB(["--config", LINEAR, *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jobs/train.py: error: "), captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--name", ".."], "jobs/train.py: error: --name: run.name must be a plain folder name"),
        (["--name", "a\nb"], "(got 'a\\nb')"),
        (["--set", "train.memory_budget=infGiB"], "train.memory_budget must be a size"),
        (["--set", "optim.lr=inf"], "optim.lr must be a finite number > 0 (got inf)"),
        (["--set", f"train.seed={2**63}"], "train.seed must be <= 9007199254740991"),
    ],
)
def test_the_job_entrypoint_refuses_in_one_line(capsys, args: list[str], expected: str) -> None:
    assert expected in _job_error(capsys, *args)


def test_the_job_refuses_an_unreadable_config_in_one_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe[train]\n")
    assert JOB(["--config", str(bad), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"jobs/train.py: error: config file {bad} is not UTF-8 text (byte 0: 0xff); "
        "save it as UTF-8\n"
    )


def test_a_hidden_config_file_gives_a_plain_run_name(tmp_path: Path, capsys) -> None:
    hidden = tmp_path / ".exp.toml"
    hidden.write_text(Path(LINEAR).read_text())
    assert JOB(["--config", str(hidden), "--print-config"]) == 0
    name = tomllib.loads(capsys.readouterr().out)["run"]["name"]
    assert name.startswith("exp-") and RunSection(name=name).name == name
