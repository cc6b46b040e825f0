"""The refusals of model.init_from and model.freeze: each one line, a ConfigError naming the
key (and the path or the tensor), from the driver's check (check_init, a model on the meta
device) and from the load itself (apply_init) alike. No Ray."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from raymb.config import ModelSection
from raymb.errors import ConfigError
from raymb.models import build_model
from raymb.models.init_from import apply_init, check_init

D, CLASSES = 6, 3
SHAPES = {"0.weight": (5, D), "0.bias": (5,), "2.weight": (3, 5), "2.bias": (3,)}


def _check(section) -> None:
    with torch.device("meta"):
        check_init(build_model(section, D, CLASSES), section)


def _apply(section) -> None:
    apply_init(build_model(section, D, CLASSES), section, load=True)


def _file(tmp_path, **changes) -> str:
    """An mlp's tensors with `changes` (a shape; None: the key left out), as safetensors."""
    shapes = {**SHAPES, **changes}
    path = tmp_path / "w.safetensors"
    save_file({k: torch.zeros(s) for k, s in shapes.items() if s is not None}, str(path))
    return str(path)


def _fifo(tmp_path) -> str:
    path = tmp_path / "model.safetensors"
    os.mkfifo(path)
    return str(path)


def _not_safetensors(tmp_path) -> str:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\xff" * 64)
    return str(path)


def _pickled_objects(tmp_path) -> str:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"0.weight": torch.zeros(5, D), "extra": torch.nn.Linear(1, 1)}, path)
    return str(path)


def _empty_folder(tmp_path) -> str:
    (tmp_path / "weights").mkdir()
    return str(tmp_path / "weights")


# (what init_from is, the keys beside it, what the one line must say)
CASES = {
    "wrong shape": (
        lambda p: _file(p, **{"2.weight": (4, 5)}),
        {},
        "2.weight has shape [4, 5] in the file, [3, 5] in the model",
    ),
    "missing key": (
        lambda p: _file(p, **{"2.weight": None, "2.bias": None}),
        {},
        "the model's 2.weight is not in the file (2 missing keys)",
    ),
    "missing, another allowed": (
        lambda p: _file(p, **{"2.weight": None, "2.bias": None}),
        {"init_allow_missing": ["2.bias"]},
        "the model's 2.weight is not in the file (1 missing keys)",
    ),
    "unexpected key": (
        lambda p: _file(p, **{"head.weight": (2, 2)}),
        {},
        "head.weight is not a key of the model (1 unexpected keys)",
    ),
    "missing path": (lambda p: str(p / "nothing"), {}, "does not exist"),
    "a FIFO": (_fifo, {}, "is a FIFO, not a regular file"),
    "a folder without weights": (_empty_folder, {}, "a folder with no model.pt"),
    "not safetensors": (_not_safetensors, {}, "not a safetensors file"),
    "pickled objects": (_pickled_objects, {}, "not a readable torch file of weights"),
    "freeze matches nothing": (
        lambda p: _file(p),
        {"freeze": ["encoder.*"]},
        "model.freeze pattern 'encoder.*' matches no parameter",
    ),
}


@pytest.mark.parametrize("entry", [_check, _apply], ids=["check_init", "apply_init"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_refusal_is_one_line_naming_the_key(case: str, entry, tmp_path) -> None:
    make, keys, expected = CASES[case]
    given = make(tmp_path)
    section = ModelSection(name="mlp", hidden=[5], init_from=given, **keys)
    with pytest.raises(ConfigError) as e:
        entry(section)
    message = str(e.value)
    assert expected in message and "\n" not in message, message
    key = "model.freeze" if "freeze" in keys else "model.init_from"
    assert message.startswith(key) and (key == "model.freeze" or given in message), message


def test_allowing_them_by_pattern_loads_the_rest(tmp_path) -> None:
    path = _file(tmp_path, **{"2.weight": None, "head.weight": (2, 2)})
    section = ModelSection(
        name="mlp",
        hidden=[5],
        init_from=path,
        init_allow_missing=["2.*"],
        init_allow_unexpected=["head.*"],
    )
    _check(section)
    model = build_model(section, D, CLASSES)
    apply_init(model, section, load=True)
    assert torch.equal(model.state_dict()["0.weight"], torch.zeros(5, D))
    assert not torch.equal(model.state_dict()["2.weight"], torch.zeros(3, 5))  # as built
