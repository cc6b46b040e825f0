"""Your own model, loss and metrics keep the contract: W workers x k microbatches end with the
parameters of one plain torch process on the whole step (rtol 1e-5), and so do the
validation metrics. The runs are raymb's real epoch loop on the torch session (gloo processes,
no Ray); the reference is a hand-written single-process loop over the same rows.

Data: 60 training rows in 2 files, G = 16: steps of 16, 16, 16 and a short last one of 12
(W = 2: 6 rows a worker, microbatches of 4 and a short 2). shuffle "none": each epoch's steps
are the rows in file order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from custom_parts import (
    TWO_INPUTS,
    columns,
    hits,
    masked_tokens,
    tagger,
    two_inputs,
    weighted_loss,
    write_tokens,
    write_two_inputs,
)
from local_run import train_local

from raymb import load_config
from raymb.rundir.checkpoint import read

ROWS, G, EPOCHS, LR, SEED = 60, 16, 2, 0.5, 3
TWO = (
    *TWO_INPUTS,
    'loss.name="custom_parts:weighted_loss"',
    'metrics.name="custom_parts:hits"',
)
TOKENS = (
    'data.inputs=["ids"]',
    'data.targets=["tags", "mask"]',
    'data.label="tags"',
    'model.name="custom_parts:tagger"',
    'loss.name="custom_parts:masked_tokens"',
)
SPLITS = {
    "W2k2": ("scale.workers=2", "train.microbatch_size=4"),
    "W1k4": ("scale.workers=1", "train.microbatch_size=4"),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("custom")
    write_two_inputs(root / "two" / "train", ROWS, seed=1)
    write_two_inputs(root / "two" / "val", 22, seed=2, files=1)
    write_tokens(root / "tokens" / "train", ROWS, seed=3)
    return root


def _run(data: Path, tmp: Path, kind: str, split: str, *sets: str, name: str = "") -> dict:
    config = load_config(
        None,
        [
            f"data.train={data / kind / 'train'}",
            f"data.val={data / kind / 'val'}" if (data / kind / "val").exists() else 'data.val=""',
            f"run.storage_path={tmp}",
            f"run.name={name or f'{kind}-{split}'}",
            "data.shuffle=none",
            f"train.epochs={EPOCHS}",
            f"train.global_batch_size={G}",
            f"train.seed={SEED}",
            "optim.name=sgd",
            f"optim.lr={LR}",
            "optim.momentum=0.5",
            *SPLITS[split],
            *sets,
        ],
    )
    run = train_local(config)
    payload = read(run.checkpoint)
    state = read(Path(run.checkpoint).parent / "state.pt")
    return {"params": payload["state_dict"], "progress": state["progress"]}


def _reference(build, loss, data: dict, inputs: list[str]) -> torch.nn.Module:
    """One process, whole steps: each step's loss is sum(loss) / sum(count) over its rows."""
    torch.manual_seed(SEED)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)
    n = len(next(iter(data.values())))
    for _ in range(EPOCHS):
        for start in range(0, n, G):
            rows = {k: v[start : start + G] for k, v in data.items()}
            sums, counts = loss(model(**{c: rows[c] for c in inputs}), rows)
            opt.zero_grad()
            (sums.sum() / counts.sum()).backward()
            opt.step()
    return model


def _assert_params(got: dict, model: torch.nn.Module) -> None:
    for key, want in model.state_dict().items():
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6, msg=key)


def test_two_inputs_weighted_loss_and_metrics_equal_one_process(data, tmp_path) -> None:
    """W = 2 x k = 2 straight, and a run resized and resumed: W = 1 x k = 4 to step 3, 2 x 2 to
    step 6, 1 x 4 to the end (8 steps). Both end with the parameters of one process on the
    whole steps, and with its validation loss and metrics (on 2 workers and on 1)."""
    runs = {"W2k2": _run(data, tmp_path, "two", "W2k2", *TWO)}
    legs = [("W1k4", "train.max_steps=3"), ("W2k2", "train.max_steps=6"), ("W1k4", "")]
    for split, stop in legs:
        sets = ("checkpoint.every_steps=1", *TWO, *([stop] if stop else []))
        runs["resized"] = _run(data, tmp_path, "two", split, *sets, name="resized")
    assert runs["resized"]["progress"]["resumed_from_steps"] == [3, 6]
    assert runs["resized"]["progress"]["step"] == runs["W2k2"]["progress"]["step"] == 8
    train = columns(data / "two" / "train")
    shapes = {"tab": (3,), "ids": (6,)}
    model = _reference(lambda: two_inputs(shapes, 3), weighted_loss, train, ["tab", "ids"])
    for run in runs.values():
        _assert_params(run["params"], model)
    # Validation: the weighted loss and both metrics over all 22 rows, by hand.
    val = columns(data / "two" / "val")
    with torch.no_grad():
        out = model(tab=val["tab"], ids=val["ids"])
        sums, counts = weighted_loss(out, val)
        metrics = hits(out, val)
    for run in runs.values():
        progress = run["progress"]
        assert progress["val_loss"] == pytest.approx((sums.sum() / counts.sum()).item(), rel=1e-5)
        got = progress["val_metrics"]
        for name, (total, count) in metrics.items():
            assert got[f"val_{name}"] == pytest.approx((total / count).item(), rel=1e-5)


def test_masked_token_loss_is_divided_by_the_steps_tokens(data, tmp_path) -> None:
    # W = 2 x k = 2: the step's tokens are counted across both workers and both microbatches
    # (the two-input test's runs cover W = 1 x k = 4).
    runs = {"W2k2": _run(data, tmp_path, "tokens", "W2k2", *TOKENS)}
    train = columns(data / "tokens" / "train")
    model = _reference(lambda: tagger({}, 3), masked_tokens, train, ["ids"])
    for run in runs.values():
        _assert_params(run["params"], model)

    # The test can fail: the mean of the microbatches' means (each divided by its own
    # tokens) is another model.
    def mean_of_means(outputs, targets):
        sums, counts = masked_tokens(outputs, targets)
        halves = [(sums[i : i + 4].sum() / counts[i : i + 4].sum()) for i in range(0, len(sums), 4)]
        return torch.stack(halves).mean().expand(len(sums)), torch.ones(len(sums))

    wrong = _reference(lambda: tagger({}, 3), mean_of_means, train, ["ids"])
    differs = any(
        not torch.allclose(runs["W2k2"]["params"][k], v, rtol=1e-5, atol=1e-6)
        for k, v in wrong.state_dict().items()
    )
    assert differs


def test_lr_find_divides_by_the_counted_loss_count(data, tmp_path) -> None:
    """raymb.lr_find(config, loss=<closure>) on local processes: the first step's loss in
    lr_find.csv is the initial model's sum(loss) / sum(count) over the step's rows."""
    import csv

    import raymb

    def loss(outputs, targets):  # a closure, as raymb.train takes one
        return weighted_loss(outputs, targets)

    config = load_config(
        None,
        [
            f"data.train={data / 'two' / 'train'}",
            'data.val=""',
            f"run.storage_path={tmp_path}",
            "data.shuffle=none",
            f"train.global_batch_size={G}",
            f"train.seed={SEED}",
            *SPLITS["W2k2"],
            *TWO[:3],
        ],
    )
    result = raymb.lr_find(config, loss=loss, steps=10, local=True)
    assert len(result.lrs) >= 1
    with open(tmp_path / "default-lr-find" / "lr_find.csv", newline="") as f:
        first = float(next(csv.DictReader(f))["loss"])
    torch.manual_seed(SEED)
    model = two_inputs({"tab": (3,), "ids": (6,)}, 3)
    rows = {k: v[:G] for k, v in columns(data / "two" / "train").items()}
    with torch.no_grad():
        sums, counts = weighted_loss(model(tab=rows["tab"], ids=rows["ids"]), rows)
    assert first == pytest.approx((sums.sum() / counts.sum()).item(), rel=1e-5)


def test_param_sync_divides_each_workers_steps_by_its_own_count(data, tmp_path) -> None:
    """Local SGD (train.sync = "param", the mean every 2 steps) with the masked token loss: each
    worker steps on its own rows' sum / its own count, then the parameters are averaged. The
    reference: two models stepped by hand on each half of every step, averaged alike."""
    W, every = 2, 2
    sets = ("train.sync=param", f"train.average_every={every}", "train.epochs=1", *TOKENS)
    config = load_config(
        None,
        [
            f"data.train={data / 'tokens' / 'train'}",
            'data.val=""',
            f"run.storage_path={tmp_path}",
            "data.shuffle=none",
            f"train.global_batch_size={G}",
            f"train.seed={SEED}",
            "optim.name=sgd",
            f"optim.lr={LR}",
            "optim.momentum=0.5",
            "scale.workers=2",
            "train.microbatch_size=8",
            *sets,
        ],
    )
    got = read(train_local(config).checkpoint)["state_dict"]
    rows = columns(data / "tokens" / "train")
    torch.manual_seed(SEED)
    first = tagger({}, 3)
    models = [first, tagger({}, 3)]
    models[1].load_state_dict(first.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=LR, momentum=0.5) for m in models]
    steps = 0
    for start in range(0, ROWS, G):
        n = min(G, ROWS - start)
        for r, (model, opt) in enumerate(zip(models, opts)):
            a, b = start + r * n // W, start + (r + 1) * n // W  # rank r's contiguous part
            part = {k: v[a:b] for k, v in rows.items()}
            sums, counts = masked_tokens(model(ids=part["ids"]), part)
            opt.zero_grad()
            (sums.sum() / counts.sum()).backward()
            opt.step()
        steps += 1
        if steps % every == 0 or start + G >= ROWS:
            with torch.no_grad():
                for p, q in zip(models[0].parameters(), models[1].parameters()):
                    mean = (p + q) / 2
                    p.copy_(mean)
                    q.copy_(mean)
    _assert_params(got, models[0])
