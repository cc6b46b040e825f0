"""Dropout and data augmentation keep the equivalence contract: the real epoch loop on gloo
processes (raymb.worker.epochs under TorchSessions, as raymb.driver.local.train_torch runs
it, without Ray) with W=2 workers x k=2 microbatches and W=1 x k=4 ends with the parameters of
a plain one-process torch loop over the same steps; a run stopped at max_steps and resumed
(on another W) ends there too; every row gets the same draws under W = 1, 2 and k = 1, 4.

All the runs on W processes share one spawn of W processes (runs one after another), so the
module costs two process starts.
"""

from __future__ import annotations

import ast
import csv
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_refused
from torch.nn import functional as F

from raymb import load_config
from raymb.config.toml import to_toml
from raymb.core import rng
from raymb.core.order import epoch_order
from raymb.core.shape import InputShape
from raymb.data.augment import Augment
from raymb.data.columns import table_to_tensors
from raymb.driver.launch import run_torch
from raymb.driver.local import local_spec
from raymb.models import build_model
from raymb.rundir.checkpoint import STATE_FILE, read
from raymb.worker.epochs import train_loop
from raymb.worker.session import TorchSession

pytestmark = pytest.mark.timeout(900)

ROWS, G, EPOCHS, SEED = 64, 16, 2, 5  # 4 steps an epoch, 8 in all
FAMILIES = {
    "mlp": [
        "model.name=mlp",
        "model.hidden=[16, 16]",
        "model.dropout=0.3",
        "data.augment.noise_std=0.2",
    ],
    "gpt": [
        "model.name=gpt",
        "model.depth=2",
        "model.width=16",
        "model.heads=2",
        "model.dropout=0.2",
    ],
    "cnn": [
        "model.name=cnn",
        "model.widths=[4, 8]",
        "model.norm=group",
        "model.dropout=0.1",
        "data.augment.hflip=0.5",
        "data.augment.crop_padding=3",
        "data.augment.rotate_degrees=20",
    ],
}
DATA = {"mlp": "cls", "gpt": "tok", "cnn": "img", "rec": "cls"}
RESUMED = ("mlp", "cnn")  # stopped after 3 steps on W=2, finished on W=1
RECORDER = textwrap.dedent(
    """
    import os
    from pathlib import Path

    import torch

    from raymb.core import rng
    from raymb.models.dropout import RowDropout

    built = [0]


    class Recorder(torch.nn.Module):
        '''Writes every training row it sees: (epoch, row id, its input, its dropout mask).'''

        def __init__(self, d, out):
            super().__init__()
            built[0] += 1
            world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
            self.file = Path(__file__).parent / f"rec-w{world}-n{built[0]:03d}-r{rank}.txt"
            self.drop = RowDropout(0.5, stream=7)
            self.lin = torch.nn.Linear(d, out)

        def forward(self, x):
            keys = rng.current()
            if self.training and keys is not None:
                mask = self.drop(torch.ones_like(x))
                with open(self.file, "a") as f:
                    for row, xr, mr in zip(keys.rows.tolist(), x.tolist(), mask.tolist()):
                        f.write(repr((keys.epoch, row, xr, mr)) + "\\n")
            return self.lin(self.drop(x))


    def make(d, out):
        return Recorder(d, out)
    """
)


def _config(root: Path, name: str, family: str, world: int, k: int, *extra: str):
    data = root / DATA[family]
    model = ["model.name=rowrec:make"] if family == "rec" else FAMILIES[family]
    return load_config(
        None,
        [
            f"data.train={data / 'train'}",
            "data.val=none",
            f"run.storage_path={root / 'runs'}",
            f"run.name={name}",
            f"scale.workers={world}",
            f"train.global_batch_size={G}",
            f"train.microbatch_size={G // world // k}",
            f"train.epochs={EPOCHS}",
            f"train.seed={SEED}",
            "optim.lr=0.05",
            *model,
            *extra,
        ],
    )


def _loops(specs, *, session_factory) -> None:
    """The epoch loop of each spec in turn, in this process group (as train_torch's one)."""
    torch.set_num_threads(1)
    for spec in specs:
        Path(spec.run_dir.path).mkdir(parents=True, exist_ok=True)
        train_loop({"spec": spec}, session_factory(Path(spec.run_dir.path)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[Path]:
    from raymb.data.synthetic import generate

    root = tmp_path_factory.mktemp("exact")
    generate("classification", root / "cls", rows=ROWS, shards=3, features=6, classes=3, seed=1)
    generate("tokens", root / "tok", rows=ROWS, shards=2, block_size=8, seed=1)
    generate("images", root / "img", rows=ROWS, shards=2, classes=4, seed=1)
    (root / "rowrec.py").write_text(RECORDER)
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(root))  # the spawned processes inherit sys.path
    try:
        two = [_config(root, f"{f}-w2", f, 2, 2) for f in FAMILIES]
        two += [_config(root, f"{f}-resumed", f, 2, 2, "train.max_steps=3") for f in RESUMED]
        two += [_config(root, "rec-w2k2", "rec", 2, 2)]
        run_torch(_loops, ([local_spec(c) for c in two],), 2)
        # The cnn's W=1 run validates too: its val_loss must be that of unaugmented rows.
        val = {"cnn": [f"data.val={root / 'img' / 'val'}"]}
        one = [_config(root, f"{f}-w1", f, 1, 4, *val.get(f, [])) for f in FAMILIES]
        one += [_config(root, f"{f}-resumed", f, 1, 4) for f in RESUMED]
        one += [_config(root, "rec-w1k4", "rec", 1, 4), _config(root, "rec-w1k1", "rec", 1, 1)]
        run_torch(_loops, ([local_spec(c) for c in one],), 1)
        yield root
    finally:
        mp.undo()


def _final(root: Path, name: str) -> dict[str, torch.Tensor]:
    return read(TorchSession(root / "runs" / name).latest() / "model.pt")["state_dict"]


def _reference(config) -> dict[str, torch.Tensor]:
    """One process, a plain torch loop: each step's G rows of the epoch's order as one batch,
    their keys the rows' places in that order, the mean loss (over tokens for the gpt)."""
    spec = local_spec(config)
    plan, inputs = spec.plan, InputShape.from_dict(spec.plan.inputs)
    features, label = config.data.features, config.data.label_column
    x_all, y_all = table_to_tensors(pa.concat_tables(spec.train.blocks), features, label)
    torch.manual_seed(SEED)
    model = build_model(config.model, inputs.model_shape, plan.out_features)
    opt = torch.optim.SGD(model.parameters(), lr=config.optim.lr, momentum=config.optim.momentum)
    augment = Augment.of(config.data.augment)
    for epoch in range(EPOCHS):
        order = epoch_order(config.data.shuffle, SEED, epoch, spec.train.file_rows)
        for step in range(plan.steps_per_epoch):
            ids = torch.arange(step * G, min((step + 1) * G, ROWS))
            keys = rng.RowKeys(SEED, epoch, ids)
            x, y = inputs.collate(x_all[order[ids]], y_all[order[ids]], augment, keys)
            with rng.row_keys(keys):
                out = model(x)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def _assert_same(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key in want:
        torch.testing.assert_close(
            got[key], want[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{what} {k}: {m}"
        )


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-4) for k in a)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_workers_times_microbatches_equal_one_process_with_dropout_and_augmentation(runs, family):
    config = _config(runs, "reference", family, 1, 1)
    reference = _reference(config)
    _assert_same(_final(runs, f"{family}-w2"), reference, f"{family} W=2 k=2")
    _assert_same(_final(runs, f"{family}-w1"), reference, f"{family} W=1 k=4")
    # Not a tautology: the draws change the numbers, each of them.
    off = {"mlp": ["model.dropout=0", "data.augment.noise_std=0"], "gpt": ["model.dropout=0"]}
    off["cnn"] = ["model.dropout=0", "data.augment.hflip=0", "data.augment.crop_padding=0"]
    off["cnn"].append("data.augment.rotate_degrees=0")
    for setting in off[family]:
        changed = _reference(_config(runs, "reference", family, 1, 1, setting))
        assert _differs(changed, reference), setting


@pytest.mark.parametrize("family", RESUMED)
def test_a_run_stopped_and_resumed_on_another_w_equals_the_straight_one(runs, family):
    run_dir = runs / "runs" / f"{family}-resumed"
    assert (run_dir / "checkpoint_00000003").is_dir()
    latest = TorchSession(run_dir).latest()
    assert read(latest / STATE_FILE)["progress"]["resumed_from_steps"] == [3]
    _assert_same(_final(runs, f"{family}-resumed"), _final(runs, f"{family}-w2"), family)


def test_validation_never_augments(runs):
    config = _config(runs, "cnn-w1", "cnn", 1, 4)
    with open(runs / "runs" / "cnn-w1" / "metrics.csv") as f:
        val_loss = float(list(csv.DictReader(f))[-1]["val_loss"])
    spec = local_spec(config)
    inputs = InputShape.from_dict(spec.plan.inputs)
    model = build_model(config.model, inputs.model_shape, spec.plan.out_features)
    model.load_state_dict(_final(runs, "cnn-w1"))
    model.eval()
    stored = table_to_tensors(pq.read_table(runs / "img" / "val"), "image", "label")
    keys = rng.RowKeys(SEED, EPOCHS - 1, torch.arange(len(stored[1])))
    with torch.no_grad():
        x, y = inputs.collate(*stored)
        assert val_loss == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-5)
        x, y = inputs.collate(*stored, Augment.of(config.data.augment), keys)
        assert val_loss != pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-3)


def _records(root: Path, world: int) -> list[dict]:
    """Each recorded run's {(epoch, row id): (input, mask)} over its ranks, in run order."""
    by_run: dict[str, dict] = {}
    for path in sorted(root.glob(f"rec-w{world}-n*-r*.txt")):
        run = path.name.rsplit("-r", 1)[0]
        seen = by_run.setdefault(run, {})
        for line in path.read_text().splitlines():
            epoch, row, x, mask = ast.literal_eval(line)
            assert (epoch, row) not in seen, "a row trained on twice in an epoch"
            seen[(epoch, row)] = (x, mask)
    return [by_run[run] for run in sorted(by_run)]


def test_a_row_draws_the_same_under_any_w_and_k(runs):
    (w2k2,) = _records(runs, 2)
    w1k4, w1k1 = _records(runs, 1)
    assert w2k2 == w1k4 == w1k1
    assert sorted(w2k2) == [(e, r) for e in range(EPOCHS) for r in range(ROWS)]
    # A row's id is its place in the epoch's order: the input recorded is that row's.
    spec = local_spec(_config(runs, "reference", "rec", 1, 1))
    x_all, _ = table_to_tensors(pa.concat_tables(spec.train.blocks), "features", "label")
    for epoch in range(EPOCHS):
        order = epoch_order("rows", SEED, epoch, spec.train.file_rows)
        ids = torch.arange(ROWS)
        u = rng.uniform(SEED, 7, epoch, ids, (x_all.shape[1],))
        for row in range(ROWS):
            x, mask = w2k2[(epoch, row)]
            assert x == x_all[order[row]].tolist()
            assert mask == torch.where(u[row] >= 0.5, 2.0, 0.0).tolist()


def test_print_config_no_longer_warns_about_dropout(runs):
    text = to_toml(_config(runs, "reference", "gpt", 1, 1))
    (line,) = [x for x in text.splitlines() if x.startswith("dropout")]
    assert line == "dropout = 0.2"


# --- bad values: one line, exit 2, nothing written -----------------------------------------


@pytest.mark.parametrize(
    "sets, words",
    [
        (["data.augment.hflip=2"], ["data.augment.hflip must be in [0, 1] (got 2)"]),
        (["data.augment.padding_mode=edge"], ["data.augment.padding_mode", "'reflect', 'zero'"]),
        (["data.augment.noise_std=-1"], ["data.augment.noise_std must be >= 0"]),
        (["data.augment.rotate_degrees=270"], ["data.augment.rotate_degrees", "[0, 180]"]),
        (["model.name=mlp", "model.dropout=1"], ["model.dropout must be in [0, 1) (got 1)"]),
        (["model.name=cnn", "model.dropout=-0.5"], ["model.dropout must be in [0, 1)"]),
        (["data.train=cls/train", "data.augment.crop_padding=2"], ["crop_padding", "[C, H, W]"]),
        (["data.train=cls/train", "data.augment.hflip=0.5"], ["data.augment.hflip", "[6]"]),
        (["data.train=img/train", "data.augment.crop_padding=16"], ["crop_padding=16", "16x16"]),
        (["data.train=tok/train", "data.augment.noise_std=0.1"], ["noise_std", "token blocks"]),
    ],
)
def test_bad_augmentation_and_dropout_are_one_line(runs, sets, words):
    args = ["train"]
    for s in ["data.val=none", *sets]:
        args += ["--set", s.replace("=cls/", f"={runs}/cls/").replace("=img/", f"={runs}/img/")]
    args = [a.replace("=tok/", f"={runs}/tok/") for a in args]
    work = runs / "cwd"
    work.mkdir(exist_ok=True)
    assert_refused(args, work, *words)
