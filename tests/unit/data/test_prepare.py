"""raymb prepare images|text, the tokenizers and gen-data images|tokens, without Ray.

Every check compares with an independent reference: the pixels as Pillow reads the files
we wrote, token blocks worked out by hand, statistics computed from the written data.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raymb.cli import main
from raymb.data.images import prepare_images
from raymb.data.manifest import data_defaults, find_manifest
from raymb.data.text import prepare_text
from raymb.data.tokenizer import (
    ByteTokenizer,
    load_tokenizer,
    tokenizer_from_spec,
    train_bpe,
)
from raymb.errors import DataError

# --- helpers -------------------------------------------------------------------------


def _save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _pixels(rng: np.random.Generator, h: int, w: int, gray: bool = False) -> np.ndarray:
    return rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)


def _chw(path: Path, mode: str) -> np.ndarray:
    """The reference: the file as Pillow reads it, channels first."""
    with Image.open(path) as im:
        a = np.asarray(im.convert(mode))
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _read_images(split_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(sorted(split_dir.glob("*.parquet")))
    return (
        table.column("image").combine_chunks().to_numpy_ndarray(),
        table.column("label").to_numpy(),
    )


def _read_blocks(split_dir: Path) -> list[list[int]]:
    table = pq.read_table(sorted(split_dir.glob("*.parquet")))
    return table.column("tokens").to_pylist()


def _as_set(images: np.ndarray, labels: np.ndarray) -> Counter:
    return Counter((im.tobytes(), int(label)) for im, label in zip(images, labels))


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _nothing_left(out: Path) -> bool:
    """--out absent, and no temporary sibling of it left behind."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


@pytest.fixture
def class_folders(tmp_path) -> tuple[Path, dict[Path, int]]:
    """ROOT/{a_cat,b_dog,c_emu}: 10 RGB images of 5x4 (H x W), one a JPEG, and a hidden
    file that is not an image (ignored)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "root"
    files = {}
    for label, (name, n) in enumerate((("a_cat", 4), ("b_dog", 3), ("c_emu", 3))):
        for i in range(n):
            suffix = "jpg" if (name, i) == ("b_dog", 0) else "png"
            files[_save(root / name / f"{i}.{suffix}", _pixels(rng, 5, 4))] = label
    (root / "a_cat" / ".DS_Store").write_bytes(b"\x00\x01 not an image")
    return root, files


# --- prepare images --------------------------------------------------------------------


def test_images_hold_the_files_pixels_labels_classes_and_manifest(tmp_path, class_folders):
    root, files = class_folders
    out = tmp_path / "out"
    prepare_images(root, out, val_fraction=0.2, seed=0, shards=2)

    assert json.loads((out / "classes.json").read_text()) == ["a_cat", "b_dog", "c_emu"]
    schema = pq.read_schema(next((out / "train").glob("*.parquet")))
    assert schema.field("image").type == pa.fixed_shape_tensor(pa.uint8(), [3, 5, 4])
    assert schema.field("label").type == pa.int64()
    train, val = _read_images(out / "train"), _read_images(out / "val")
    # 10 images: val max(1, round(10 * 0.2)) = 2, train 8; train 2 files, val max(1, 2 // 2).
    assert len(train[1]) == 8 and len(val[1]) == 2
    assert len(list((out / "train").glob("*.parquet"))) == 2
    assert len(list((out / "val").glob("*.parquet"))) == 1
    reference = Counter((_chw(p, "RGB").tobytes(), label) for p, label in files.items())
    assert _as_set(*train) + _as_set(*val) == reference

    found = find_manifest(str(out / "train"))
    assert found is not None and found[0] == out
    manifest = found[1]
    expected = {
        "task": "classify",
        "features": "image",
        "label": "label",
        "shape": [3, 5, 4],
        "dtype": "uint8",
        "num_classes": 3,
        "classes": "classes.json",
        "splits": {"train": {"rows": 8, "files": 2}, "val": {"rows": 2, "files": 1}},
        "seed": 0,
    }
    assert {k: manifest[k] for k in expected} == expected
    assert manifest["scale"] == pytest.approx(1 / 255)
    assert manifest["source"]["skipped"] == 0
    assert data_defaults(manifest) == {
        "features": "image",
        "task": "classify",
        "label": "label",
        "scale": pytest.approx(1 / 255),
    }


def test_grayscale_stays_one_channel_and_a_mixed_set_becomes_rgb(tmp_path):
    rng = np.random.default_rng(1)
    gray = {_save(tmp_path / "g" / c / "0.png", _pixels(rng, 3, 3, gray=True)): c for c in "ab"}
    prepare_images(tmp_path / "g", tmp_path / "out_g", val_fraction=0)
    images, _ = _read_images(tmp_path / "out_g" / "train")
    assert images.shape == (2, 1, 3, 3)
    assert _as_set(images, [0] * 2) == Counter((_chw(p, "L").tobytes(), 0) for p in gray)

    gray_path = _save(tmp_path / "m" / "a" / "0.png", _pixels(rng, 3, 3, gray=True))
    _save(tmp_path / "m" / "b" / "0.png", _pixels(rng, 3, 3))
    prepare_images(tmp_path / "m", tmp_path / "out_m", val_fraction=0)
    images, labels = _read_images(tmp_path / "out_m" / "train")
    assert images.shape == (2, 3, 3, 3)
    g = np.asarray(Image.open(gray_path))
    assert np.array_equal(images[labels == 0][0], np.stack([g, g, g]))  # gray in every channel


def test_size_resizes_and_without_it_an_odd_size_is_named(tmp_path):
    # Plain-colour images: any resize leaves every pixel that colour.
    colours = {"a": (10, 20, 30), "b": (200, 100, 0)}
    for name, colour in colours.items():
        _save(tmp_path / "r" / name / "0.png", np.full((8, 8, 3), colour, np.uint8))
    odd = _save(tmp_path / "r" / "b" / "1.png", np.full((4, 6, 3), colours["b"], np.uint8))

    with pytest.raises(DataError, match="--size") as e:
        prepare_images(tmp_path / "r", tmp_path / "out", val_fraction=0)
    assert str(odd) in str(e.value) and "4x6" in str(e.value)
    assert _nothing_left(tmp_path / "out")

    prepare_images(tmp_path / "r", tmp_path / "out", size=(5, 7), val_fraction=0)
    images, labels = _read_images(tmp_path / "out" / "train")
    assert images.shape == (3, 3, 5, 7)
    for image, label in zip(images, labels):
        colour = colours["ab"[label]]
        assert np.array_equal(image, np.broadcast_to(np.array(colour)[:, None, None], (3, 5, 7)))


def test_split_is_seeded(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(20):
        _save(tmp_path / "root" / f"c{i % 2}" / f"{i}.png", _pixels(rng, 2, 2))

    def val_images(seed: int, name: str) -> set[bytes]:
        prepare_images(tmp_path / "root", tmp_path / name, val_fraction=0.5, seed=seed)
        return {im.tobytes() for im in _read_images(tmp_path / name / "val")[0]}

    first, again, other = val_images(0, "s0"), val_images(0, "s0b"), val_images(1, "s1")
    assert len(first) == 10
    assert first == again
    assert first != other


def test_unreadable_files_are_skipped_and_counted_or_refused_with_strict(
    tmp_path, capsys, class_folders
):
    root, _ = class_folders
    notes = root / "b_dog" / "notes.txt"
    notes.write_text("not an image\n")
    # A PNG whose header reads but whose pixels are cut off: found only when decoded.
    cut = _save(root / "c_emu" / "cut.png", _pixels(np.random.default_rng(3), 5, 4))
    cut.write_bytes(cut.read_bytes()[:50])

    code, out, err = _cli(capsys, "prepare", "images", root, "--out", tmp_path / "o")
    assert code == 0, err
    assert err == f"raymb: skipped 2 unreadable files, e.g. {notes}\n"
    manifest = find_manifest(str(tmp_path / "o"))[1]
    assert manifest["source"]["skipped"] == 2
    assert sum(s["rows"] for s in manifest["splits"].values()) == 10
    assert "train 9 rows" in out

    code, out, err = _cli(capsys, "prepare", "images", root, "--out", tmp_path / "s", "--strict")
    assert code == 2
    assert err.startswith("raymb: error: ") and err.count("\n") == 1
    assert str(notes) in err
    assert _nothing_left(tmp_path / "s")


def test_out_must_be_new_or_empty(tmp_path, capsys, class_folders):
    root, _ = class_folders
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    code, _, err = _cli(capsys, "prepare", "images", root, "--out", tmp_path / "busy")
    assert code == 2 and "not an empty folder" in err and err.count("\n") == 1
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]

    (tmp_path / "empty").mkdir()
    assert _cli(capsys, "prepare", "images", root, "--out", tmp_path / "empty")[0] == 0
    assert (tmp_path / "empty" / "raymb-data.json").is_file()


# --- prepare text ----------------------------------------------------------------------


def test_byte_blocks_are_the_files_bytes_cut_by_hand(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abcdefghijé!", encoding="utf-8")  # 13 bytes: é is c3 a9
    prepare_text([text], tmp_path / "out", block_size=2, val_fraction=0.25, seed=0, shards=1)

    # T = 2: rows of 3 bytes; 13 = 4 x 3 + 1, the last byte ("!") dropped.
    by_hand = [[97, 98, 99], [100, 101, 102], [103, 104, 105], [106, 0xC3, 0xA9]]
    train, val = _read_blocks(tmp_path / "out" / "train"), _read_blocks(tmp_path / "out" / "val")
    assert len(train) == 3 and len(val) == 1  # val: max(1, round(4 x 0.25)) = 1
    assert sorted(train + val) == by_hand
    schema = pq.read_schema(next((tmp_path / "out" / "train").glob("*.parquet")))
    assert schema.field("tokens").type == pa.list_(pa.int32(), 3)

    _, manifest = find_manifest(str(tmp_path / "out" / "val"))
    expected = {
        "task": "lm",
        "features": "tokens",
        "label": None,
        "shape": [3],
        "dtype": "int32",
        "vocab_size": 256,
        "tokenizer": {"kind": "bytes"},
        "splits": {"train": {"rows": 3, "files": 1}, "val": {"rows": 1, "files": 1}},
    }
    assert {k: manifest[k] for k in expected} == expected
    assert manifest["source"]["tokens"] == 13 and manifest["source"]["dropped_tokens"] == 1
    tok = load_tokenizer(tmp_path / "out")
    assert isinstance(tok, ByteTokenizer) and tok.decode(by_hand[3]) == "jé"


def test_folders_give_their_sorted_visible_files_matching_glob(tmp_path):
    corpus = tmp_path / "corpus"
    for name, body in {
        "b.txt": "bbbb",
        "a.txt": "aaaa",
        ".hidden.txt": "hhhh",
        ".git/x.txt": "gggg",
        "sub/c.txt": "cccc",
        "sub/d.py": "dddd",
    }.items():
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_text(body)
    prepare_text([corpus], tmp_path / "out", block_size=3, val_fraction=0, glob="*.txt")
    # a.txt, b.txt, sub/c.txt: "aaaabbbbcccc" in rows of 4.
    assert sorted(_read_blocks(tmp_path / "out" / "train")) == [
        list(b"aaaa"),
        list(b"bbbb"),
        list(b"cccc"),
    ]


def test_byte_tokenizer_replaces_invalid_utf8_and_specs_recreate_it():
    tok = ByteTokenizer()
    assert tok.encode("hé") == [104, 0xC3, 0xA9]
    assert tok.decode([0xFF, 104, 0xC3]) == "\ufffdh\ufffd"
    assert isinstance(tokenizer_from_spec(json.loads(json.dumps(tok.spec))), ByteTokenizer)


def test_bpe_round_trips_has_the_vocab_size_and_is_saved(tmp_path, capsys):
    corpus = (
        "the cat sat on the mat; the dog sat on the log.\n"
        "  indented\tand tabbed, café, naïve, 日本語, emoji 🙂\r\n"
    ) * 40
    (tmp_path / "c.txt").write_text(corpus, encoding="utf-8")
    code, _, err = _cli(
        capsys, "prepare", "text", tmp_path / "c.txt", "--out", tmp_path / "out",
        "--tokenizer", "bpe", "--vocab-size", "300", "--block-size", "8",
    )  # fmt: skip
    assert code == 0, err
    tok = load_tokenizer(tmp_path / "out" / "train")
    assert tok.vocab_size == 300
    assert tok.decode(tok.encode(corpus)) == corpus
    assert tok.decode(tok.encode(" leading space")) == " leading space"

    _, manifest = find_manifest(str(tmp_path / "out"))
    assert manifest["vocab_size"] == 300
    assert manifest["tokenizer"] == {"kind": "bpe", "file": "tokenizer.json"}
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    # The written rows are the corpus's ids cut into rows of 9, the remainder dropped.
    ids = tok.encode(corpus)
    by_hand = [ids[i : i + 9] for i in range(0, len(ids) - 8, 9)]
    written = _read_blocks(tmp_path / "out" / "train") + _read_blocks(tmp_path / "out" / "val")
    assert sorted(written) == sorted(by_hand)
    assert max(max(row) for row in written) < 300

    again = tokenizer_from_spec(json.loads(json.dumps(tok.spec)))
    assert again.vocab_size == 300 and again.encode(corpus) == ids
    assert train_bpe([corpus], 300).spec == tok.spec  # training is deterministic


@pytest.mark.parametrize(
    ("files", "args", "message"),
    [
        ({"bad.txt": b"abc\xffdef"}, [], "bad.txt: not UTF-8 text (byte 3 is 0xff)"),
        ({"t.txt": b"abc"}, ["--block-size", "3"], "a block takes 4 tokens but the corpus has 3"),
        ({"e.txt": b"", "f.txt": b""}, [], "all empty"),
        ({"t.txt": b"abcdef"}, ["--tokenizer", "bpe", "--vocab-size", "100"], "--vocab-size 100"),
        ({"t.txt": b"abcdef"}, ["--vocab-size", "300"], "--vocab-size applies to --tokenizer bpe"),
        ({"t.txt": b"abcdef"}, ["--glob", "*.py"], "no files match --glob '*.py'"),
        ({}, ["missing.txt"], "missing.txt: no such file or folder"),
    ],
)
def test_text_errors_are_one_line_and_write_nothing(tmp_path, capsys, files, args, message):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, body in files.items():
        (corpus / name).write_bytes(body)
    paths = [corpus / a for a in args if a.endswith(".txt")] or [corpus]
    flags = [a for a in args if not a.endswith(".txt")]
    if "--block-size" not in flags:
        flags += ["--block-size", "2"]
    code, _, err = _cli(capsys, "prepare", "text", *paths, "--out", tmp_path / "out", *flags)
    assert code == 2
    assert err.startswith("raymb: error: ") and err.count("\n") == 1
    assert message in err
    assert _nothing_left(tmp_path / "out")


# --- gen-data images | tokens ----------------------------------------------------------


def test_gen_data_images_are_prepared_and_learnable(tmp_path, capsys):
    out = tmp_path / "img"
    code, _, err = _cli(capsys, "gen-data", "images", "--out", out, "--rows", "300")
    assert code == 0, err
    folder, manifest = find_manifest(str(out / "train"))
    assert folder == out and manifest["shape"] == [3, 16, 16] and manifest["num_classes"] == 10
    assert len(json.loads((out / "classes.json").read_text())) == 10
    (x, y), (xv, yv) = _read_images(out / "train"), _read_images(out / "val")
    assert x.shape == (300, 3, 16, 16) and len(yv) == 60  # val: round(300 x 0.2)
    # Nearest class mean, learnt on train: a classifier far simpler than a CNN.
    x, xv = x.reshape(len(x), -1) / 255, xv.reshape(len(xv), -1) / 255
    means = np.stack([x[y == c].mean(0) for c in range(10)])
    predicted = ((xv[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == yv).mean() > 0.9


def test_gen_data_tokens_are_prepared_and_as_predictable_as_the_manifest_says(tmp_path, capsys):
    out = tmp_path / "tok"
    code, _, err = _cli(capsys, "gen-data", "tokens", "--out", out, "--rows", "800")
    assert code == 0, err
    folder, manifest = find_manifest(str(out / "train"))
    assert folder == out and manifest["shape"] == [33] and manifest["task"] == "lm"
    assert isinstance(load_tokenizer(out), ByteTokenizer)
    blocks = np.array(_read_blocks(out / "train"))
    assert blocks.shape == (800, 33)
    # The conditional entropy of the next byte given this one, counted from the data.
    pairs = np.stack([blocks[:, :-1].ravel(), blocks[:, 1:].ravel()], 1)
    counts = Counter(map(tuple, pairs.tolist()))
    totals = Counter(a for a, _ in pairs.tolist())
    entropy = -sum(n * np.log(n / totals[a]) for (a, _), n in counts.items()) / len(pairs)
    assert entropy == pytest.approx(manifest["source"]["entropy_nats"], abs=0.03)


def test_gen_data_new_kinds_are_seeded_and_old_kinds_keep_their_defaults(tmp_path, capsys):
    for name in ("a", "b"):
        assert _cli(capsys, "gen-data", "tokens", "--out", tmp_path / name, "--rows", "10")[0] == 0
    a, b = (pq.read_table(tmp_path / n / "train") for n in "ab")
    assert a.equals(b)

    code, out, _ = _cli(capsys, "gen-data", "classification", "--out", tmp_path / "c")
    truth = json.loads(out.splitlines()[-1])
    assert code == 0 and truth["classes"] == 3 and truth["noise"] == 0.1
    code, _, err = _cli(capsys, "gen-data", "tokens", "--out", tmp_path / "t", "--classes", "3")
    assert code == 2 and "--classes does not apply" in err
