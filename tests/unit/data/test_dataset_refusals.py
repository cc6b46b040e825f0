"""Issue 20, the data side: gen-data and prepare never write into an existing dataset, a link
or a file; links out of a prepared folder's ROOT are skipped (or refused with --strict);
written files and folders take the umask's modes; an outlier label does not size the model;
two writers of one file do not collide; each bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_refused, tree
from PIL import Image

from raymb import storage
from raymb.cli import main
from raymb.data.checks import MAX_CLASSES, check_dataset
from raymb.data.listing import resolve_files
from raymb.data.manifest import write_manifest
from raymb.data.synthetic import generate
from raymb.data.synthetic_tables import MAX_CLASSES as SYNTH_MAX_CLASSES
from raymb.data.text import prepare_text
from raymb.data.tokenizer import load_tokenizer, train_bpe
from raymb.errors import DataError
from raymb.rundir.checkpoint import atomic_save

KINDS = ("linear", "regression", "classification", "images", "tokens")
NAME_IT = "name the data's folder"


@pytest.fixture
def cwd(tmp_path):
    """A working folder holding an existing dataset, a file, a link to an empty folder, a
    dangling link, a folder of text and one of images."""
    generate("linear", tmp_path / "data", rows=64, shards=4)
    (tmp_path / "file.txt").write_text("not a folder\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to("empty")
    (tmp_path / "dangling").symlink_to("nowhere")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("some text to cut into blocks\n")
    _png(tmp_path / "imgs" / "cat" / "a.png", 200)
    return tmp_path


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(path)


# --- item 3 and item 9: gen-data and prepare refuse their --out before any work --------


@pytest.mark.parametrize("kind", KINDS)
def test_gen_data_leaves_an_existing_dataset_byte_for_byte(cwd, kind):
    before = tree(cwd / "data")
    assert len([p for p in before if p.endswith(".parquet")]) == 6  # 4 train + 2 val parts
    # assert_refused checks that nothing under cwd changed: the dataset's bytes included.
    assert_refused(["gen-data", kind, "--out", "data"], cwd, "--out data", "not an empty folder")
    assert tree(cwd / "data") == before


TEXT = ["prepare", "text", "texts", "--block-size", "2"]


def _gen(kind: str, *flags: str) -> list[str]:
    return ["gen-data", kind, "--out", "new", *flags]


BATTERY = [
    # --out a file, for every kind
    *((["gen-data", k, "--out", "file.txt"], ["--out file.txt", "is a file"]) for k in KINDS),
    (["prepare", "images", "imgs", "--out", "file.txt"], ["--out file.txt", "is a file"]),
    # --out a link: the rename would replace the link, or write where it points
    (["gen-data", "linear", "--out", "link"], ["--out link", "symbolic link"]),
    (["gen-data", "tokens", "--out", "dangling"], ["--out dangling", "symbolic link"]),
    ([*TEXT, "--out", "link"], ["--out link", "symbolic link"]),
    (["prepare", "images", "imgs", "--out", "dangling"], ["--out dangling", "symbolic link"]),
    # --glob outside the folders named
    ([*TEXT, "--out", "new", "--glob", "/etc/*"], ["--glob '/etc/*'", "relative"]),
    ([*TEXT, "--out", "new", "--glob", "../*"], ["--glob '../*'", "'..'"]),
    ([*TEXT, "--out", "new", "--glob", ""], ["--glob ''"]),
    # sizes that ran out of memory or ran on: refused, naming the bound, before any array
    (_gen("classification", "--classes", "1000000000"), ["--classes", "100000"]),
    (_gen("regression", "--rows", "1000000000000"), ["--rows", "10000000"]),
    (_gen("regression", "--rows", "1000000", "--shards", "100000"), ["--shards", "10000"]),
    (_gen("regression", "--features", "1000000"), ["--features", "100000"]),
    # (4096 + round(0.2 x 4096) = 819 rows) x (50000 features + 3 classes) = 4915 x 50003
    (_gen("classification", "--features", "50000"), ["245764745 values", "134217728"]),
    (_gen("tokens", "--block-size", "1000000000"), ["--block-size", "16777216"]),
    (_gen("tokens", "--rows", "1000000000000"), ["--rows", "16777216"]),
    (_gen("images", "--classes", "1000000000"), ["--classes", "1000"]),
    (_gen("images", "--rows", "1000000000"), ["--rows", "150000"]),
]


@pytest.mark.parametrize(("args", "words"), BATTERY, ids=[" ".join(a) for a, _ in BATTERY])
def test_bad_data_input_is_one_line_exit_2_nothing_written(cwd, args, words):
    assert_refused(args, cwd, *words)


def test_gen_data_into_a_new_or_empty_folder_still_works(cwd, capsys):
    assert main(["gen-data", "regression", "--out", str(cwd / "empty"), "--rows", "20"]) == 0
    assert sorted(tree(cwd / "empty")) == [
        "train",
        *(f"train/part-{i:05d}.parquet" for i in range(4)),
        "truth.json",
        "val",
        *(f"val/part-{i:05d}.parquet" for i in range(2)),
    ]
    assert not [p for p in cwd.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_data_train_root_is_refused_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    assert main(["train", "--set", 'data.train="/"', "--set", 'run.storage_path="runs"']) == 2
    seconds = time.monotonic() - start  # imports already done count little: the check is all
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"raymb: error: data.train: / is the root of the filesystem; {NAME_IT}"]
    assert seconds < 2.0
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="whole filesystem"):
        resolve_files("/*.parquet")


def test_a_folder_that_is_no_dataset_fails_at_its_first_other_file(tmp_path):
    # Sorted, depth first: a/ holds a parquet name, b/ a note; c/ is never listed.
    for name in ("a/x.parquet", "b/notes.md", "c/y.parquet", ".hidden/z.txt", "_tmp/w.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    with pytest.raises(DataError, match=r"not a parquet file: .*b/notes\.md"):
        resolve_files(str(tmp_path))
    (tmp_path / "b" / "notes.md").unlink()
    files, _ = resolve_files(str(tmp_path))
    assert files == [str(tmp_path / "a" / "x.parquet"), str(tmp_path / "c" / "y.parquet")]


# --- item 5: links out of ROOT ---------------------------------------------------------


def test_prepare_images_skips_links_that_leave_root(tmp_path, capsys):
    root, outside = tmp_path / "root", tmp_path / "outside"
    _png(root / "cat" / "a.png", 200)
    _png(root / "bird" / "b.png", 100)
    _png(outside / "secret.png", 7)
    _png(outside / "dog" / "d.png", 9)
    (root / "dog").symlink_to(outside / "dog")  # a class folder elsewhere
    (root / "cat" / "evil.png").symlink_to(outside / "secret.png")  # an image elsewhere
    (root / "bird" / "again.png").symlink_to(root / "cat" / "a.png")  # inside ROOT: kept
    out = tmp_path / "out"
    assert main(["prepare", "images", str(root), "--out", str(out), "--val-fraction", "0"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"raymb: skipped 2 links that leave {root}, e.g. {root / 'dog'}"]

    assert json.loads((out / "classes.json").read_text()) == ["bird", "cat"]
    table = pq.read_table(out / "train")
    pixels = np.unique(table.column("image").combine_chunks().storage.flatten())
    assert pixels.tolist() == [
        100,
        200,
    ]  # bird's two (one the link to cat's), cat's own: no 7, no 9
    assert sorted(table.column("label").to_pylist()) == [0, 0, 1]
    source = json.loads((out / "raymb-data.json").read_text())["source"]
    assert source["skipped_links"] == 2
    assert source["skipped_link_examples"] == [str(root / "dog"), str(root / "cat" / "evil.png")]

    line = assert_refused(
        ["prepare", "images", "root", "--out", "strict", "--strict"], tmp_path, "--strict", "dog"
    )
    assert str(outside / "dog") in line


def test_prepare_text_never_reads_a_link_out_of_its_folder(tmp_path, capsys):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "a.txt").write_text("plain words, nothing to hide here\n")
    (outside / "secret.txt").write_text("AWS_SECRET_ACCESS_KEY=abc123abc123abc123\n")
    (root / "sub" / "link.txt").symlink_to(outside / "secret.txt")
    (root / "inside.txt").symlink_to(root / "a.txt")  # inside ROOT: kept
    out = tmp_path / "out"
    args = ["prepare", "text", str(root), "--out", str(out), "--block-size", "3"]
    assert main([*args, "--val-fraction", "0"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"raymb: skipped 1 links that leave {root}, e.g. {root / 'sub' / 'link.txt'}"]

    rows = pq.read_table(out / "train").column("tokens").combine_chunks()
    written = bytes(np.asarray(rows.flatten()).astype(np.uint8))
    assert b"SECRET" not in written and b"abc123" not in written
    # The two copies of a.txt (itself and the link inside ROOT), 35 bytes each, in blocks of 4.
    assert len(written) == 2 * 35 // 4 * 4
    assert json.loads((out / "raymb-data.json").read_text())["source"]["files"] == 2

    line = assert_refused(
        ["prepare", "text", "root", "--out", "strict", "--block-size", "3", "--strict"],
        tmp_path,
        "--strict",
        "link.txt",
    )
    assert "secret.txt" in line


def test_a_manifest_tokenizer_file_must_stay_in_its_folder(tmp_path):
    folder, outside = tmp_path / "set", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    bpe = train_bpe(["some text for a tiny tokenizer, some text"], 300)
    (outside / "tokenizer.json").write_text(bpe.to_json())

    names = ("../outside/tokenizer.json", str(outside / "tokenizer.json"), 3, "tokenizer.json")
    for name in names:
        if name == "tokenizer.json":  # in the folder, but a link out of it
            (folder / name).symlink_to(outside / name)
        write_manifest(folder, {"task": "lm", "tokenizer": {"kind": "bpe", "file": name}})
        with pytest.raises(DataError, match="is not in the folder") as e:
            load_tokenizer(folder)
        assert "\n" not in str(e.value)

    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").write_text(bpe.to_json())  # the file itself, in the folder
    assert load_tokenizer(folder).encode("some text") == bpe.encode("some text")


# --- item 6: modes -----------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(root: Path) -> set[tuple[str, int]]:
    paths = [root, *root.rglob("*")]
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in paths}


def test_written_files_and_folders_take_the_umask(tmp_path, umask, capsys):
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask  # 0644/0755 under the usual 022
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("hello world " * 20)

    generate("classification", tmp_path / "synth", rows=40)  # shards and truth.json
    assert main(["gen-data", "tokens", "--out", str(tmp_path / "tokens"), "--rows", "20"]) == 0
    prepare_text([texts], tmp_path / "prepared", block_size=4, tokenizer="bpe", vocab_size=260)
    run = storage.resolve(tmp_path / "run")
    for name in ("run.json", "status.json", "summary.json"):
        (run / name).write_text("{}\n")
    (tmp_path / "ckpt").mkdir()
    atomic_save({"w": np.arange(3).tolist()}, tmp_path / "ckpt" / "model.pt")
    write_manifest(tmp_path / "ckpt", {"task": "lm"})
    tmp = storage.temp_sibling(tmp_path / "predictions.parquet")  # predict's temporary file

    for folder in ("synth", "tokens", "prepared", "run", "ckpt"):
        assert _modes(tmp_path / folder) == {("dir", dir_mode), ("file", file_mode)}, folder
    assert stat.S_IMODE(tmp.stat().st_mode) == file_mode
    assert umask != 0o022 or (file_mode, dir_mode) == (0o644, 0o755)


# --- item 7: an outlier label ------------------------------------------------------------


def _labelled(path: Path, labels: list[int]) -> Path:
    features = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2 * len(labels), np.float32)), 2)
    pq.write_table(pa.table({"features": features, "label": pa.array(labels, pa.int64())}), path)
    return path


def test_one_outlier_label_does_not_set_the_class_count(tmp_path):
    assert SYNTH_MAX_CLASSES == MAX_CLASSES == 100_000
    (tmp_path / "data").mkdir()
    _labelled(tmp_path / "data" / "a.parquet", [0, 1, 2])
    bad = _labelled(tmp_path / "data" / "b.parquet", [1, 10**12, 0])
    with pytest.raises(DataError) as e:
        check_dataset(str(tmp_path / "data"), "features", "label", max_classes=MAX_CLASSES)
    message = str(e.value)
    assert "\n" not in message
    for word in (str(bad), "1000000000000", "model.num_classes", "100000"):
        assert word in message

    # The largest label the bound takes: 99,999, i.e. 100,000 classes.
    edge = _labelled(tmp_path / "edge.parquet", [0, MAX_CLASSES - 1])
    assert check_dataset(str(edge), "features", "label", max_classes=MAX_CLASSES).num_classes == (
        MAX_CLASSES
    )
    # With model.num_classes set (no bound passed), the labels are the config's business.
    info = check_dataset(str(bad), "features", "label")
    assert info.num_classes == 10**12 + 1


# --- item 11: two writers of one file ----------------------------------------------------


def test_two_concurrent_atomic_saves_of_one_path_both_succeed(tmp_path):
    import torch

    path = tmp_path / "model.pt"
    payloads = [{"w": torch.full((512, 512), float(i))} for i in (1, 2)]
    for _ in range(10):
        start, errors = threading.Barrier(2), []

        def save(obj, start=start, errors=errors):
            start.wait()
            try:
                atomic_save(obj, path)
            except BaseException as e:  # noqa: BLE001 - reported below, in the test's thread
                errors.append(e)

        threads = [threading.Thread(target=save, args=(p,)) for p in payloads]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        got = torch.load(path, weights_only=True)["w"]
        assert any(torch.equal(got, p["w"]) for p in payloads)  # one whole file, not a mix
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_temporary_names_are_unique_and_removed_on_failure(tmp_path):
    target = tmp_path / "out.parquet"
    a, b = storage.temp_sibling(target), storage.temp_sibling(target)
    assert a != b and a.exists() and b.exists() and a.name.startswith(".out.parquet.")
    a.unlink()
    b.unlink()

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"x": Unsaveable()}, tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []
