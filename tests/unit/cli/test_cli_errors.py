"""argparse's own refusals (an unknown flag, a missing argument, a bad choice or number) are one
line like every other refusal, exit 2, naming the command's --help; nothing is written.

The batteries run their cases warm (forked from tests/cli_server.py, raymb.cli imported once);
here every command is refused by a new `python -m raymb.cli` too, its time counting every
import: the 2 s bar as a user meets it."""

from __future__ import annotations

import pytest
from conftest import assert_refused


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["train", "--bogus"], ["unrecognized arguments: --bogus", "--help"]),
        ([], ["required: COMMAND", "raymb --help"]),
        (["predict"], ["raymb predict", "--checkpoint", "raymb predict --help"]),
        (["train", "--set"], ["--set: expected one argument", "raymb train --help"]),
        (["gen-data", "spirals", "--out", "x"], ["invalid choice", "raymb gen-data --help"]),
        (["eval", "--checkpoint"], ["--checkpoint: expected one argument", "raymb eval --help"]),
    ],
)
def test_argparse_refusals_are_one_line(tmp_path, args: list[str], words: list[str]) -> None:
    line = assert_refused(args, tmp_path, *words)
    assert line.startswith("raymb")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["train", "--bogus"], ["unrecognized arguments: --bogus"]),
        (["train", "--set", "optim.lr=nan"], ["optim.lr", "finite"]),
        (["tune", "--config", "missing.toml"], ["config file not found: missing.toml"]),
        (["lr-find", "--steps", "1e9"], ["--steps 1e9", "at most"]),
        (["eval", "--checkpoint", "none", "--data", "x.parquet"], ["checkpoint file not found"]),
        (["gen-data", "regression", "--out", "file.txt"], ["--out file.txt", "is a file"]),
        (["prepare", "text", "none", "--out", "o", "--block-size", "2"], ["no such file"]),
        (["runs"], ["no such directory"]),
    ],
    ids=lambda v: v[0] if isinstance(v, list) and v and v[0][0] != "-" else None,
)
def test_a_new_process_refuses_every_command_in_one_line_under_2_s(tmp_path, args, words):
    (tmp_path / "file.txt").write_text("not a folder\n")
    assert_refused(args, tmp_path, *words, cold=True)
