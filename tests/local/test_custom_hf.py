"""A Hugging Face transformers model trains through raymb with its own inputs (input_ids and
attention_mask, by name) and stays exact: W = 2 x k = 2 (from the run's seed) and W = 1 x k = 4
(from model.init_from's weights) end with the parameters of one plain torch process started
from the same weights; the init_from run's first train_loss is the loaded model's loss, computed
by hand. Two runs: each spawned process imports transformers. A 2-layer BERT built from
a config alone (dropout 0: transformers' dropout draws from torch's generator, not the row)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from local_run import train_local

from raymb.config import Config
from raymb.rundir.checkpoint import read

pytest.importorskip("transformers")

ROWS, T, VOCAB, G, SEED, LR = 40, 8, 30, 16, 5, 0.1
BERT = {
    "model_type": "bert",
    "vocab_size": VOCAB,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 16,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Token rows with 3 to T real tokens (right padding, id 0), a class from the first."""
    root = tmp_path_factory.mktemp("hf")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, size=(ROWS, T))
    lengths = rng.integers(3, T + 1, size=ROWS)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)
    ids = ids * mask
    label = (ids[:, 1] > VOCAB // 2).astype(np.int64)
    table = pa.table(
        {
            "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), T),
            "attention_mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.ravel()), T),
            "label": label,
        }
    )
    (root / "train").mkdir()
    pq.write_table(table.slice(0, 20), root / "train" / "a.parquet")
    pq.write_table(table.slice(20), root / "train" / "b.parquet")
    return root


def _config(data: Path, tmp: Path, name: str, workers: int, **model) -> Config:
    return Config.from_dict(
        {
            "data": {
                "train": str(data / "train"),
                "inputs": ["input_ids", "attention_mask"],
                "shuffle": "none",
            },
            "model": {
                "name": "transformers",
                "head": "sequence_classification",
                "overrides": BERT,
                **model,
            },
            "optim": {"name": "sgd", "lr": LR, "momentum": 0.0},
            "train": {
                "epochs": 2,
                "global_batch_size": G,
                "microbatch_size": 4,
                "seed": SEED,
                "log_every": 1,
            },
            "scale": {"workers": workers},
            "run": {"storage_path": str(tmp), "name": name},
        }
    )


def _columns(data: Path) -> dict[str, torch.Tensor]:
    table = pa.concat_tables(pq.read_table(p) for p in sorted((data / "train").glob("*.parquet")))
    return {
        "input_ids": torch.from_numpy(np.stack(table.column("input_ids").to_pylist())),
        "attention_mask": torch.from_numpy(np.stack(table.column("attention_mask").to_pylist())),
        "label": torch.from_numpy(table.column("label").to_numpy()),
    }


def _bert():
    import transformers

    config = transformers.AutoConfig.for_model(**BERT, num_labels=2)
    return transformers.AutoModelForSequenceClassification.from_config(config)


def _trained(model, data: Path):
    """The reference: `model` stepped by one plain torch process on the whole steps."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rows = _columns(data)
    for _ in range(2):
        for start in range(0, ROWS, G):
            step = {k: v[start : start + G] for k, v in rows.items()}
            out = model(input_ids=step["input_ids"], attention_mask=step["attention_mask"])
            opt.zero_grad()
            torch.nn.functional.cross_entropy(out.logits, step["label"]).backward()
            opt.step()
    return model


def _assert_params(payload: dict, model) -> None:
    for key, want in model.state_dict().items():
        torch.testing.assert_close(payload["state_dict"][key], want, rtol=1e-5, atol=1e-6, msg=key)


def test_exact_across_workers_and_microbatches_and_from_the_given_weights(data, tmp_path) -> None:
    """W = 2 x k = 2 from the run's seed, and W = 1 x k = 4 from init_from's weights: each ends
    with the parameters of one plain torch process started from the same weights, and the
    init_from run's first train_loss is the loaded model's loss on the first step's rows."""
    from safetensors.torch import save_file

    torch.manual_seed(123)  # other weights than the run's seed would draw
    start = _bert()
    path = tmp_path / "start.safetensors"
    save_file({k: v.contiguous() for k, v in start.state_dict().items()}, str(path))
    rows = {k: v[:G] for k, v in _columns(data).items()}
    with torch.no_grad():
        out = start(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"])
        want = torch.nn.functional.cross_entropy(out.logits, rows["label"]).item()

    seeded = train_local(_config(data, tmp_path, "w2", 2))
    loaded = train_local(_config(data, tmp_path, "init", 1, init_from=str(path)))

    torch.manual_seed(SEED)
    _assert_params(read(seeded.checkpoint), _trained(_bert(), data))
    _assert_params(read(loaded.checkpoint), _trained(start, data))
    with open(loaded.run_dir / "metrics.csv", newline="") as f:
        first = next(csv.DictReader(f))
    assert first["step"] == "1"
    assert float(first["train_loss"]) == pytest.approx(want, rel=1e-5)
