"""model.name = "transformers": a Hugging Face model with a head, built from its config alone
(overrides, a config.json file or a model folder; nothing downloaded), run forward with its own
inputs. The checks are properties of the models themselves (a padded position changes nothing,
a causal model's earlier logits ignore later tokens), not of raymb's code. No Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from raymb.config import ModelSection
from raymb.errors import ConfigError
from raymb.models import build_model

T, VOCAB, CLASSES = 8, 100, 3
BERT = {
    "model_type": "bert",
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": VOCAB,
    "max_position_embeddings": 16,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
GPT2 = {
    "model_type": "gpt2",
    "n_layer": 2,
    "n_embd": 32,
    "n_head": 2,
    "vocab_size": VOCAB,
    "n_positions": 16,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}


def _model(head: str, out: int = CLASSES, shape=(T,), **keys):
    torch.manual_seed(0)
    section = ModelSection(name="transformers", head=head, **keys)
    return build_model(section, shape, out).eval()


def test_a_tiny_bert_classifies_with_input_ids_and_attention_mask() -> None:
    model = _model("sequence_classification", overrides=BERT)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert len(model.bert.encoder.layer) == 2 and model.config.num_labels == CLASSES
    ids = torch.randint(1, VOCAB, (4, T))
    mask = torch.ones(4, T, dtype=torch.long)
    mask[:, 5:] = 0  # the last 3 positions are padding
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        other = ids.clone()
        other[:, 5:] = torch.randint(1, VOCAB, (4, 3))  # new tokens where the mask is 0
        again = model(input_ids=other, attention_mask=mask).logits
        unmasked = model(input_ids=other, attention_mask=torch.ones_like(mask)).logits
    assert logits.shape == (4, CLASSES)
    torch.testing.assert_close(again, logits)  # a padded position is never read
    assert not torch.allclose(unmasked, logits)  # while an attended one is


def test_a_tiny_gpt2_causal_lm_predicts_each_position_from_the_earlier_ones() -> None:
    model = _model("causal_lm", out=VOCAB, overrides=GPT2)
    assert type(model).__name__ == "GPT2LMHeadModel"
    ids = torch.randint(0, VOCAB, (2, T))
    changed = ids.clone()
    changed[:, -1] = (ids[:, -1] + 1) % VOCAB
    mask = torch.ones(2, T, dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        after = model(input_ids=changed, attention_mask=mask).logits
    assert logits.shape == (2, T, VOCAB)
    torch.testing.assert_close(after[:, :-1], logits[:, :-1])
    assert not torch.allclose(after[:, -1], logits[:, -1])


@pytest.mark.parametrize(
    "head, name",
    [("token_classification", "BertForTokenClassification"), ("masked_lm", "BertForMaskedLM")],
)
def test_the_other_heads(head: str, name: str) -> None:
    out = CLASSES if head == "token_classification" else VOCAB
    model = _model(head, out=out, overrides=BERT)
    assert type(model).__name__ == name
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, VOCAB, (2, T))).logits
    assert logits.shape == (2, T, out)


def test_config_from_a_folder_or_its_file_with_overrides_over_it(tmp_path) -> None:
    keys = {**BERT, "num_hidden_layers": 3, "id2label": {"0": "a", "1": "b"}}
    (tmp_path / "config.json").write_text(json.dumps(keys))
    for given in (tmp_path, tmp_path / "config.json"):
        model = _model("sequence_classification", config=str(given))
        assert len(model.bert.encoder.layer) == 3
        assert model.config.num_labels == CLASSES  # the data's classes, not the saved head's
        model = _model(
            "sequence_classification", config=str(given), overrides={"num_hidden_layers": 1}
        )
        assert len(model.bert.encoder.layer) == 1


def test_the_same_seed_builds_the_same_model() -> None:
    a, b = (_model("causal_lm", out=VOCAB, overrides=GPT2) for _ in range(2))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize(
    "keys, shape, out, expected",
    [
        (
            {"overrides": {**BERT, "num_hiden_layers": 2}},
            (T,),
            CLASSES,
            "model.overrides.num_hiden_layers",
        ),
        ({"overrides": {"model_type": "no-such-model"}}, (T,), CLASSES, "'no-such-model'"),
        ({"overrides": BERT}, (32,), CLASSES, "32 tokens"),
        ({"overrides": BERT}, (3, T), CLASSES, "token ids"),
        ({"config": "/no/such/folder"}, (T,), CLASSES, "model.config /no/such/folder"),
    ],
)
def test_refusals(keys: dict, shape: tuple, out: int, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        _model("sequence_classification", out=out, shape=shape, **keys)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_a_language_model_smaller_than_the_datas_vocabulary_is_refused() -> None:
    with pytest.raises(ConfigError, match="vocabulary of 500 ids .* vocab_size 100"):
        _model("causal_lm", out=500, overrides=GPT2)


def test_a_fifo_as_the_config_is_never_opened(tmp_path) -> None:
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is a FIFO"):
        _model("sequence_classification", config=str(fifo))


def test_a_section_without_a_config_or_a_model_type_is_refused() -> None:
    with pytest.raises(
        ConfigError, match="model.config must be set, or model.overrides.model_type"
    ):
        ModelSection(name="transformers", head="causal_lm", overrides={"n_layer": 2})
    with pytest.raises(ConfigError, match="model.head must be set"):
        ModelSection(name="transformers", config="x")


def test_import_raymb_does_not_import_transformers() -> None:
    code = "import sys, raymb, raymb.models, raymb.config; print('transformers' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
