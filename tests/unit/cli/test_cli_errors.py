"""argparse's own refusals (an unknown flag, a missing argument, a bad choice or number) are one
line like every other refusal, exit 2, naming the command's --help; nothing is written."""

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
