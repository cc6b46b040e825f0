"""The tools on checkpoints of your own model, loss and metrics (issue 36, part 8): a model of
named columns (data.inputs), a counted loss and metrics of your own (tests/custom_parts.py),
and a Hugging Face transformers model, which is config, not code.

Checkpoints are made with raymb.rundir.checkpoint's model_payload, as a run's rank 0 writes
them; every number is checked against a computation by hand on the same model and rows
(tests/local/test_custom_tools.py does the same on a real run's checkpoint).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from custom_parts import CLASSES, columns, hits, two_inputs, write_two_inputs

from raymb import Config
from raymb.cli import main
from raymb.core.shape import InputShape
from raymb.errors import CheckpointError, RaymbError
from raymb.rundir.checkpoint import MODEL_FILE, atomic_save, model_payload
from raymb.tools.evaluate import evaluate
from raymb.tools.predict import predict
from raymb.tools.sample import sample

pytestmark = pytest.mark.timeout(120)

SHAPES = {"tab": (3,), "ids": (6,)}
NAMED = {"inputs": ["tab", "ids"], "targets": ["label", "weight"]}
OWN = {
    "model": {"name": "custom_parts:two_inputs"},
    "loss": {"name": "custom_parts:weighted_loss"},
    "metrics": {"name": "custom_parts:hits"},
}


def _inputs(shapes: dict) -> dict:
    columns = tuple((name, shape) for name, shape in shapes.items())
    return InputShape(task="classify", shape=(), columns=columns).to_dict()


def _save(directory: Path, model: torch.nn.Module, config: dict, **extra) -> Path:
    """A model.pt as a run of named columns writes it (in_features 1: no data.features)."""
    directory.mkdir(parents=True, exist_ok=True)
    inputs = extra.pop("inputs", _inputs(SHAPES))
    payload = model_payload(model, config, 1, CLASSES, True, inputs=inputs, **extra)
    atomic_save(payload, directory / MODEL_FILE)
    return directory


def _config(**sections) -> dict:
    data = {"train": "unused", "val": None, **NAMED, **sections.pop("data", {})}
    return Config.from_dict({"data": data, **sections}).to_dict()


@pytest.fixture
def two(tmp_path) -> tuple[Path, Path, torch.nn.Module]:
    """(checkpoint, data folder, model): the two-input model with the weighted loss and the
    metrics of custom_parts, seeded weights, 13 rows in 2 files."""
    torch.manual_seed(0)
    model = two_inputs(SHAPES, CLASSES)
    write_two_inputs(tmp_path / "data", 13, seed=4)
    return _save(tmp_path / "ckpt", model, _config(**OWN)), tmp_path / "data", model


def test_eval_of_a_named_columns_custom_loss_run_is_sum_over_count_by_hand(two) -> None:
    """Weighted loss: sum(ce * w) / sum(w) over all 13 rows (however the files cut them), its
    count the summed weights, accuracy and both metrics as custom_parts.hits' sums / counts."""
    checkpoint, data, model = two
    rows = columns(data)
    with torch.no_grad():
        out = model(tab=rows["tab"], ids=rows["ids"])
    ce = torch.nn.functional.cross_entropy(out, rows["label"], reduction="none").double()
    w = rows["weight"].double()
    right = (out.argmax(dim=1) == rows["label"]).double()
    got = evaluate(str(checkpoint), str(data), batch_rows=5, trust_model_code=True)
    assert got["loss"] == pytest.approx(((ce * w).sum() / w.sum()).item(), rel=1e-6)
    assert got["count"] == pytest.approx(w.sum().item(), rel=1e-6)
    assert got["accuracy"] == pytest.approx(right.mean().item())
    assert got["metrics"]["acc"] == pytest.approx(right.mean().item())
    assert got["metrics"]["werr"] == pytest.approx((((1 - right) * w).sum() / w.sum()).item())
    assert got["rows"] == 13
    assert set(got["metrics"]) == set(hits(out, rows))  # named as the function names them


def test_predict_on_named_inputs_writes_the_argmax_by_hand(two, tmp_path) -> None:
    checkpoint, data, model = two
    rows = columns(data)
    out = tmp_path / "preds.parquet"
    written = predict(str(checkpoint), str(data), out, batch_rows=4, trust_model_code=True)
    assert written["rows"] == 13
    table = pq.read_table(out)
    # The inputs are dropped; the other columns (the targets here) are kept.
    assert table.column_names == ["weight", "label", "prediction", "probabilities"]
    with torch.no_grad():
        logits = model(tab=rows["tab"], ids=rows["ids"])
    assert table.column("prediction").to_pylist() == logits.argmax(dim=1).tolist()
    probabilities = torch.tensor(table.column("probabilities").to_pylist())
    torch.testing.assert_close(probabilities, torch.softmax(logits, dim=1))


def test_export_of_a_named_inputs_model_takes_its_columns_by_name(two, tmp_path) -> None:
    """ONNX input names are the columns; the file's outputs on the data's rows are the torch
    model's logits; TorchScript takes the columns in order; without --data: one line."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from raymb.tools.export import export

    checkpoint, data, model = two
    with pytest.raises(RaymbError, match="--data: needed to export a model of named inputs"):
        export(str(checkpoint), "onnx", tmp_path / "m.onnx", trust_model_code=True)
    rows = columns(data)
    with torch.no_grad():
        want = model(tab=rows["tab"], ids=rows["ids"])
    written = export(
        str(checkpoint), "onnx", tmp_path / "m.onnx", data=str(data), trust_model_code=True
    )
    session = onnxruntime.InferenceSession(written["out"], providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["tab", "ids"]
    (got,) = session.run(["output"], {"tab": rows["tab"].numpy(), "ids": rows["ids"].numpy()})
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)
    export(str(checkpoint), "torchscript", tmp_path / "m.pt", data=str(data), trust_model_code=True)
    traced = torch.jit.load(str(tmp_path / "m.pt"))
    torch.testing.assert_close(traced(rows["tab"], rows["ids"]), want, rtol=1e-5, atol=1e-6)


def test_sample_refuses_a_model_that_is_not_a_language_model(two) -> None:
    checkpoint, _, _ = two
    with pytest.raises(CheckpointError, match="not a language model .*named inputs tab, ids"):
        sample(str(checkpoint), "hi", 2, trust_model_code=True)


# ---------------------------------------------------------------- code the file names


def _linear_with(tmp_path: Path, **sections) -> Path:
    """A built-in linear model of data.features whose config names a loss or metrics."""
    config = Config.from_dict(
        {"data": {"features": "features", "label": "label"}, "model": {"name": "linear"}} | sections
    ).to_dict()
    directory = tmp_path / "ckpt"
    directory.mkdir()
    model = torch.nn.Linear(3, CLASSES)
    atomic_save(model_payload(model, config, 3, CLASSES, True), directory / MODEL_FILE)
    return directory


@pytest.mark.parametrize(
    ("key", "sections"),
    [
        ("loss.name", {"loss": {"name": "custom_parts:weighted_loss"}}),
        ("metrics.name", {"metrics": {"name": "custom_parts:hits"}}),
    ],
)
def test_eval_refuses_a_loss_or_metrics_of_your_own_without_the_flag(
    tmp_path, capsys, key, sections
) -> None:
    """raymb eval runs loss.name and metrics.name: code the file names. One line naming the key
    and the flag, before torch is imported (exit 2). predict runs neither: no flag needed."""
    checkpoint = _linear_with(tmp_path, **sections)
    (tmp_path / "data").mkdir()
    assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{key} 'custom_parts:" in err and "--trust-model-code" in err
    from raymb.tools.load import preflight

    preflight(checkpoint)  # what predict, export and sample check: the model alone


def test_a_model_given_from_python_is_named_in_one_line(tmp_path) -> None:
    """model= from Python is not in the config: with `given` in the payload, or a built-in
    model.name beside named inputs (which only model= allows), the tools say so."""
    torch.manual_seed(0)
    model = two_inputs(SHAPES, CLASSES)
    for name, given in [("mlp", ()), ("custom_parts:two_inputs", ("model",))]:
        config = _config(model={"name": name})
        checkpoint = _save(tmp_path / name, model, config, given=given)
        with pytest.raises(CheckpointError) as e:
            evaluate(str(checkpoint), str(tmp_path), trust_model_code=True)
        assert "model was given from Python (raymb.train(model=...))" in str(e.value)
        assert "['state_dict']" in str(e.value) and "\n" not in str(e.value)
    checkpoint = _save(tmp_path / "loss", model, _config(**OWN), given=("loss",))
    with pytest.raises(CheckpointError, match=r"loss was given from Python"):
        evaluate(str(checkpoint), str(tmp_path), trust_model_code=True)


# ---------------------------------------------------------------- transformers

BERT = {
    "model_type": "bert",
    "vocab_size": 20,
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "max_position_embeddings": 8,
}
T = 6


def _bert_run(tmp_path: Path) -> tuple[Path, Path, torch.nn.Module]:
    """A 1-layer BERT sequence classifier whose model.config is a folder, and data."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(BERT))
    torch.manual_seed(0)
    hf = transformers.AutoConfig.for_model(**BERT, num_labels=CLASSES)
    model = transformers.AutoModelForSequenceClassification.from_config(hf).eval()
    config = _config(
        data={"inputs": ["input_ids", "attention_mask"], "targets": None},
        model={"name": "transformers", "config": str(folder), "head": "sequence_classification"},
    )
    shapes = {"input_ids": (T,), "attention_mask": (T,)}
    checkpoint = _save(tmp_path / "ckpt", model, config, inputs=_inputs(shapes))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 20, (9, T), generator=g)
    mask = (torch.arange(T)[None] < torch.randint(2, T + 1, (9, 1), generator=g)).long()
    label = torch.randint(0, CLASSES, (9,), generator=g)
    import pyarrow as pa

    table = pa.table(
        {
            "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel().numpy()), T),
            "attention_mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.ravel().numpy()), T),
            "label": label.numpy(),
        }
    )
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "a.parquet")
    return checkpoint, tmp_path / "data", model


def test_transformers_checkpoint_evaluates_without_the_flag_nor_its_config_folder(
    tmp_path,
) -> None:
    """transformers builds from a config, no code of the file's: no --trust-model-code. The
    checkpoint stores the resolved config, so model.config's folder may be gone; a checkpoint
    without it (written before) needs the folder, and says so in one line."""
    checkpoint, data, model = _bert_run(tmp_path)
    rows = columns(data)
    with torch.no_grad():
        out = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    want = torch.nn.functional.cross_entropy(out, rows["label"]).item()
    shutil.rmtree(tmp_path / "bert")
    got = evaluate(str(checkpoint), str(data))
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["accuracy"] == pytest.approx((out.argmax(1) == rows["label"]).double().mean().item())
    preds = tmp_path / "p.parquet"
    predict(str(checkpoint), str(data), preds)
    assert pq.read_table(preds).column("prediction").to_pylist() == out.argmax(1).tolist()

    payload = torch.load(checkpoint / MODEL_FILE, weights_only=True)
    del payload["transformers"]  # as a checkpoint from before the key
    atomic_save(payload, checkpoint / MODEL_FILE)
    with pytest.raises(CheckpointError) as e:
        evaluate(str(checkpoint), str(data))
    assert "model.config" in str(e.value) and "holds no transformers config" in str(e.value)
    assert "\n" not in str(e.value)
