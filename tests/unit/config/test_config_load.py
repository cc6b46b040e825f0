"""Building a config reads nothing; load_config, on the driver, merges a prepared folder's
manifest once. A saved config (run.json, a checkpoint) is already merged: building it again,
on a worker or by `raymb eval`, keeps what it says whatever the folder's manifest says now.
Plain Python, no Ray."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import pytest

from raymb import Config, ConfigError, load_config
from raymb.cli import main
from raymb.data.manifest import write_manifest
from raymb.load import with_manifest


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """A folder as `raymb prepare images` leaves it: train/, val/ and raymb-data.json."""
    folder = tmp_path / "digits"
    (folder / "train").mkdir(parents=True)
    (folder / "val").mkdir()
    write_manifest(
        folder,
        {"task": "classify", "features": "image", "label": "label", "scale": 1 / 255},
    )
    return folder


def test_load_config_takes_the_manifests_keys(prepared: Path) -> None:
    config = load_config(None, [f"data.train={prepared / 'train'}"])
    assert (config.data.features, config.data.task) == ("image", "classify")
    assert config.data.scale == pytest.approx(1 / 255)
    assert config.data.val == str(prepared / "val")  # the folder's own validation split
    # The config's own keys win over the manifest's.
    mine = load_config(None, [f"data.train={prepared / 'train'}", "data.features=pixels"])
    assert mine.data.features == "pixels"


def test_a_tokenized_tables_inputs_come_from_its_manifest(tmp_path: Path) -> None:
    """`raymb prepare text --tokenizer ... --text-column ...` records the columns a model reads
    by name: a config that names neither data.features nor data.inputs reads them."""
    folder = tmp_path / "reviews"
    (folder / "train").mkdir(parents=True)
    manifest = {"task": "classify", "features": "input_ids", "label": "label"}
    write_manifest(folder, {**manifest, "inputs": ["input_ids", "attention_mask"]})
    config = load_config(None, [f"data.train={folder / 'train'}"])
    assert config.data.inputs == ["input_ids", "attention_mask"]
    one = load_config(None, [f"data.train={folder / 'train'}", "data.features=input_ids"])
    assert (one.data.inputs, one.data.features) == (None, "input_ids")


def test_print_config_shows_the_manifests_keys(prepared: Path, capsys) -> None:
    assert main(["train", "--print-config", "--set", f"data.train={prepared / 'train'}"]) == 0
    text = capsys.readouterr().out
    assert '\nfeatures = "image"\n' in text and '\ntask = "classify"\n' in text
    assert f'\nval = "{prepared / "val"}"\n' in text


def test_from_dict_reads_no_file(prepared: Path, monkeypatch) -> None:
    raw = {"data": {"train": str(prepared / "train")}}

    def refuse(*args, **kwargs):
        raise AssertionError(f"Config.from_dict read the disk: {args}")

    with monkeypatch.context() as m:
        for name in ("stat", "open", "listdir", "scandir"):
            m.setattr(os, name, refuse)
        m.setattr(builtins, "open", refuse)
        config = Config.from_dict(raw)
        saved = Config.from_saved(config.to_dict())
    # Not merged: the defaults, and no validation set (data.train is set without data.val).
    assert (config.data.features, config.data.task, config.data.scale) == ("features", "auto", None)
    assert config.data.val is None
    assert saved == config


def test_a_saved_config_keeps_its_keys_whatever_the_manifest_says(prepared: Path) -> None:
    # Saved by a run started with the keys the manifest gave then...
    config = load_config(None, [f"data.train={prepared / 'train'}"])
    saved = config.to_dict()
    # ...and read back after the folder was prepared again with another feature column.
    write_manifest(prepared, {"task": "classify", "features": "pixels", "label": "digit"})
    assert load_config(None, [f"data.train={prepared / 'train'}"]).data.features == "pixels"
    for again in (Config.from_dict(saved), Config.from_saved(saved)):
        assert again == config
        assert (again.data.features, again.data.label) == ("image", "label")


def test_with_manifest_leaves_other_configs_alone(prepared: Path, tmp_path: Path) -> None:
    raw = {"data": {"train": str(tmp_path / "plain")}, "train": {"epochs": 3}}
    assert with_manifest(raw) == raw  # not a prepared folder
    assert with_manifest({}) == {}
    assert with_manifest({"data": 3}) == {"data": 3}  # Config.from_dict says what is wrong
    merged = with_manifest({"data": {"train": str(prepared)}, "run": {"name": "r"}})
    assert merged["run"] == {"name": "r"} and merged["data"]["features"] == "image"
    assert "val" not in merged["data"]  # data.train is the folder, not its train split


def test_an_unreadable_manifest_is_one_line_from_load_config_only(prepared: Path) -> None:
    (prepared / "raymb-data.json").write_text("{not json")
    train = str(prepared / "train")
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"data.train={train}"])
    message = str(info.value)
    assert message.startswith("data.train: ") and "raymb-data.json" in message
    assert "\n" not in message
    assert Config.from_dict({"data": {"train": train}}).data.train == train
