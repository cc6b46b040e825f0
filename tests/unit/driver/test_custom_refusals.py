"""Your own model, loss and metrics, refused before Ray starts in one line that names what to
fix (raymb.driver.custom's dry run, raymb.data.named's column check): a column the model names
that the data lacks, a loss of the wrong shape, a negative count, metrics that are not
{name: (sum, count)}, init_from shapes that do not fit, a callable that cannot be pickled.
The dry run builds the model, so torch is imported: these call the CLI's entry in this
process (where tests/custom_parts imports), without the 2 s bar of the refusals that come
before torch; tests/unit/cli/test_cli_errors.py proves the entry's exit code and line are the
process's."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from conftest import tree
from custom_parts import TWO_INPUTS, write_two_inputs

import raymb
from raymb import ConfigError, load_config
from raymb.cli import main

TWO = [
    *TWO_INPUTS,
    "train.global_batch_size=8",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("custom-refusals")
    write_two_inputs(root / "train", 16, seed=1, files=1)
    return root


def _refused(data: Path, tmp_path: Path, sets: list[str], *words: str, capsys) -> str:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    before = tree(work)
    args = ["train", "--set", f"data.train={data / 'train'}", "--set", f"run.storage_path={work}"]
    for s in sets:
        args += ["--set", s]
    capsys.readouterr()
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raymb: error: "), lines
    line = lines[0]
    for w in words:
        assert w in line, (w, line)
    assert tree(work) == before, "a refusal writes nothing"
    return line


@pytest.mark.parametrize(
    ("sets", "words"),
    [
        (['data.inputs=["tab", "idz"]', *TWO[1:]], ("no feature column 'idz'", "columns: tab")),
        ([*TWO, 'loss.name="custom_parts:mean_loss"'], ("custom_parts:mean_loss", "shape []")),
        ([*TWO, 'loss.name="custom_parts:negative_count"'], ("negative count",)),
        ([*TWO, 'metrics.name="custom_parts:not_a_dict"'], ("metrics.name", "(sum, count)")),
        ([*TWO, 'loss.name="custom_parts:nothing"'], ("loss.name", "no callable 'nothing'")),
        ([*TWO[:2], "train.global_batch_size=8"], ("model.name = linear", "data.inputs")),
    ],
    ids=["missing-column", "loss-shape", "negative-count", "metrics-type", "no-loss", "one-tensor"],
)
def test_own_code_that_cannot_train_is_one_line(data, tmp_path, sets, words, capsys) -> None:
    _refused(data, tmp_path, sets, *words, capsys=capsys)


def test_init_from_shapes_that_do_not_fit(data, tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    weights = tmp_path / "start.safetensors"
    save_file({"head.weight": torch.zeros(3, 9), "head.bias": torch.zeros(3)}, str(weights))
    sets = [*TWO, f'model.init_from="{weights}"', 'model.init_allow_missing=["embed.*"]']
    _refused(data, tmp_path, sets, "head.weight", "[3, 9]", "[3, 7]", capsys=capsys)


def test_a_callable_that_cannot_be_pickled(data, tmp_path) -> None:
    lock = threading.Lock()

    def loss(outputs, targets):  # closes over a lock: it cannot travel to the workers
        with lock:
            return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")

    sets = [f"data.train={data / 'train'}", f"run.storage_path={tmp_path / 'runs'}"]
    sizes = ["train.global_batch_size=8", "train.microbatch_size=8", "scale.workers=1"]
    config = load_config(None, [*sets, 'data.features=["weight"]', *sizes])
    with pytest.raises(ConfigError) as info:
        raymb.train(config, loss=loss)
    assert str(info.value).startswith("loss= cannot be pickled")
    assert not os.path.exists(tmp_path / "runs" / "default")


@pytest.mark.parametrize(
    ("sets", "words"),
    [
        (
            ['metrics.name="custom_parts:hits"'],
            ("checkpoint.metric='val_f1' is not a metric of this run", "val_acc, val_werr"),
        ),
        ([], ("checkpoint.metric='val_f1'", "no metrics of your own: set metrics.name")),
    ],
    ids=["unknown-metric", "no-metrics"],
)
def test_checkpoint_metric_must_be_one_the_metrics_return(
    data, tmp_path, sets, words, capsys
) -> None:
    own = ['checkpoint.metric="val_f1"', 'checkpoint.mode="max"', f"data.val={data / 'train'}"]
    _refused(data, tmp_path, [*TWO, *own, *sets], *words, capsys=capsys)


def test_tune_metric_must_be_one_the_metrics_return(data, tmp_path, capsys) -> None:
    """raymb tune: the first point's dry run names the metrics, before Ray starts."""
    work = tmp_path / "work"
    work.mkdir()
    sweep = tmp_path / "sweep.toml"
    sweep.write_text('[tune]\nmetric = "val_f1"\nmode = "max"\n[tune.space]\n"optim.lr" = [0.1]\n')
    sets = [f"data.train={data / 'train'}", f"data.val={data / 'train'}"]
    sets += [f"run.storage_path={work}", *TWO, 'metrics.name="custom_parts:hits"']
    args = ["tune", "--config", str(sweep)]
    for s in sets:
        args += ["--set", s]
    capsys.readouterr()
    assert main(args) == 2
    line = capsys.readouterr().err.strip()
    assert "tune.metric='val_f1' is not a metric of this run" in line, line
    assert "val_acc, val_werr" in line and len(line.splitlines()) == 1
    assert not any(work.iterdir()), "a refusal writes nothing"
