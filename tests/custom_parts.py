"""A model, losses and metrics of a user's own, as a config names them (custom_parts:name) and
as the tests' single-process references compute them: the tests of raymb's open model, loss
and metrics contract (tests/local/test_custom.py, tests/integration/test_session_ray.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

VOCAB, T, TAB, CLASSES = 12, 6, 3, 3
TWO_INPUTS = (
    'data.inputs=["tab", "ids"]',
    'data.targets=["label", "weight"]',
    'model.name="custom_parts:two_inputs"',
)
"""The --set keys of a run of TwoInputs on write_two_inputs's columns."""


class TwoInputs(nn.Module):
    """Tabular columns and a sequence of ids: the ids' mean embedding beside the table."""

    def __init__(self, shapes: dict, classes: int) -> None:
        super().__init__()
        assert shapes == {"tab": (TAB,), "ids": (T,)}, shapes
        self.embed = nn.Embedding(VOCAB, 4)
        self.head = nn.Linear(TAB + 4, classes)

    def forward(self, tab: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([tab, self.embed(ids).mean(dim=1)], dim=1))


def two_inputs(shapes: dict, classes: int) -> nn.Module:
    return TwoInputs(shapes, classes)


def weighted_loss(outputs: torch.Tensor, targets: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's cross-entropy times its weight, counted by its weight."""
    ce = nn.functional.cross_entropy(outputs, targets["label"], reduction="none")
    return ce * targets["weight"], targets["weight"]


def hits(outputs: torch.Tensor, targets: dict) -> dict:
    """Accuracy and the weighted error, as sums and counts."""
    right = (outputs.argmax(dim=1) == targets["label"]).double()
    w = targets["weight"].double()
    return {"acc": (right.sum(), len(right)), "werr": (((1 - right) * w).sum(), w.sum())}


def sure(outputs: torch.Tensor, targets: dict) -> dict:
    """The probability the model gives each row's label, as a sum over the rows: a metric
    that moves with every step (accuracy ties on a small set)."""
    p = torch.softmax(outputs.double(), dim=1).gather(1, targets["label"][:, None])
    return {"sure": (p.sum(), len(p))}


class Tagger(nn.Module):
    """Per-token logits over a sequence of ids (a token classifier)."""

    def __init__(self, shapes: dict, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.out = nn.Linear(8, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(ids)))


def tagger(shapes: dict, classes: int) -> nn.Module:
    return Tagger(shapes, classes)


def masked_tokens(outputs: torch.Tensor, targets: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed token loss over its counted tokens (mask 1), and their count."""
    ce = nn.functional.cross_entropy(
        outputs.reshape(-1, CLASSES), targets["tags"].reshape(-1), reduction="none"
    ).reshape(targets["tags"].shape)
    mask = targets["mask"].to(ce.dtype)
    return (ce * mask).sum(dim=1), mask.sum(dim=1)


def write_two_inputs(folder, rows: int, seed: int, files: int = 2) -> None:
    """rows of (tab, ids, weight, label) in `files` parquet files."""
    rng = np.random.default_rng(seed)
    tab = rng.normal(size=(rows, TAB)).astype(np.float32)
    ids = rng.integers(0, VOCAB, size=(rows, T))
    weight = rng.uniform(0.1, 3.0, size=rows).astype(np.float32)
    label = ((tab[:, 0] + (ids[:, 0] % 3)) > 1).astype(np.int64) + (ids[:, 1] > 8)
    table = pa.table(
        {
            "tab": pa.FixedSizeListArray.from_arrays(pa.array(tab.ravel()), TAB),
            "ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), T),
            "weight": weight,
            "label": label,
        }
    )
    _write(folder, table, files)


def write_tokens(folder, rows: int, seed: int, files: int = 2) -> None:
    """rows of (ids, tags, mask): row i counts 1 to T tokens (mask), very different counts."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(rows, T))
    tags = (ids % CLASSES).astype(np.int64)
    counted = rng.integers(1, T + 1, size=rows)
    mask = (np.arange(T)[None, :] < counted[:, None]).astype(np.int64)
    table = pa.table(
        {
            "ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), T),
            "tags": pa.FixedSizeListArray.from_arrays(pa.array(tags.ravel()), T),
            "mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.ravel()), T),
        }
    )
    _write(folder, table, files)


def _write(folder, table: pa.Table, files: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n = table.num_rows
    for i in range(files):
        part = table.slice(i * n // files, (i + 1) * n // files - i * n // files)
        pq.write_table(part, folder / f"part-{i}.parquet")


def columns(folder) -> dict[str, torch.Tensor]:
    """Every column of a folder's files, in file order, as the reference reads them."""
    table = pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("*.parquet")))
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            values = col.flatten().to_numpy().reshape(len(col), -1)
        else:
            values = col.to_numpy()
        values = values.astype(np.int64) if values.dtype.kind in "iu" else values.astype(np.float32)
        out[name] = torch.from_numpy(values)
    return out


def mean_loss(outputs: torch.Tensor, targets: dict) -> torch.Tensor:
    """Wrong: one number for the batch, not one a row."""
    return nn.functional.cross_entropy(outputs, targets["label"])


def negative_count(outputs: torch.Tensor, targets: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Wrong: a count below zero."""
    ce = nn.functional.cross_entropy(outputs, targets["label"], reduction="none")
    return ce, -torch.ones_like(ce)


def not_a_dict(outputs: torch.Tensor, targets: dict) -> float:
    """Wrong: metrics must be {name: (sum, count)}."""
    return 0.5
