"""`raymb config-schema`: the JSON Schema editors check a config file against. Every shipped
config validates against it, and what the schema refuses (unknown keys, wrong types, values
out of bounds) the loader refuses too. Plain Python, no Ray."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from raymb import ConfigError, load_config
from raymb.config import Config, json_schema, to_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pyproject.toml installs tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[3]
JOB_CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.toml"))
SCHEMA = json_schema()
VALIDATOR = jsonschema.validators.validator_for(SCHEMA)(SCHEMA)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Every message, those under a oneOf ([model]'s families) too."""
    found, errors = [], list(VALIDATOR.iter_errors(doc))
    while errors:
        e = errors.pop()
        found.append(e.message)
        errors += e.context
    return found


def test_the_schema_is_a_valid_json_schema() -> None:
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.validators.validator_for(SCHEMA).check_schema(SCHEMA)
    assert SCHEMA["title"] == "raymb config"


def test_cli_prints_the_schema() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "raymb.cli", "config-schema"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == SCHEMA


def test_every_section_and_key_is_in_the_schema_and_unknown_keys_are_not() -> None:
    assert SCHEMA["additionalProperties"] is False
    assert SCHEMA["properties"].keys() == {f.name for f in dataclasses.fields(Config)}
    sections = [(s.name, s.default_factory()) for s in dataclasses.fields(Config)]
    sections.append(("train.early_stopping", Config().train.early_stopping))
    for name, section in sections:
        ref = SCHEMA["$defs"][type(section).__name__]
        assert ref["additionalProperties"] is False, name
        assert ref["properties"].keys() == {f.name for f in dataclasses.fields(section)}, name


def test_descriptions_come_from_the_field_docs() -> None:
    data = SCHEMA["$defs"]["DataSection"]
    assert data["properties"]["train"]["description"] == (
        "Parquet file, directory, glob or URI of the training set."
    )
    assert data["description"].startswith("The training and validation data")
    # A list default (a default_factory) is written out too.
    assert SCHEMA["$defs"]["MlpModel"]["properties"]["hidden"]["default"] == [64, 64]


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_config_validates(path: Path) -> None:
    assert schema_errors(tomllib.loads(path.read_text())) == []


@pytest.mark.parametrize("path", [None, *JOB_CONFIGS], ids=lambda p: getattr(p, "name", "default"))
def test_printed_config_validates(path: Path | None) -> None:
    # --print-config output, every default written out, is a config an editor accepts.
    assert schema_errors(tomllib.loads(to_toml(load_config(path)))) == []


def test_unset_with_empty_or_none_validates() -> None:
    # TOML has no null: an optional key is unset with "" or "none", and the schema says so.
    doc = {"optim": {"grad_clip": "none"}, "data": {"val": ""}, "train": {"max_steps": ""}}
    assert schema_errors(doc) == []
    config = load_config(None, ["optim.grad_clip=none", "train.max_steps=''"])
    assert (config.optim.grad_clip, config.train.max_steps) == (None, None)


REFUSED = [
    # (a config as TOML, what the schema says, what the loader says)
    pytest.param(
        "[optim]\nlearning_rate = 0.1\n",
        "Additional properties are not allowed ('learning_rate' was unexpected)",
        "unknown config key optim.learning_rate",
        id="unknown-key",
    ),
    pytest.param(
        "[optimizer]\nlr = 0.1\n",
        "Additional properties are not allowed ('optimizer' was unexpected)",
        "unknown config section [optimizer]",
        id="unknown-section",
    ),
    pytest.param(
        "[train.early_stopping]\npatiense = 3\n",
        "('patiense' was unexpected)",
        "unknown config key train.early_stopping.patiense",
        id="unknown-nested-key",
    ),
    pytest.param(
        '[train]\nepochs = "5"\n',
        "'5' is not of type 'integer'",
        "train.epochs must be an integer (got '5')",
        id="string-for-int",
    ),
    pytest.param(
        "[scale]\nuse_gpu = 1\n",
        "1 is not of type 'boolean'",
        "scale.use_gpu must be true or false (got 1)",
        id="int-for-bool",
    ),
    pytest.param(
        '[optim]\nname = "nadam"\n',
        "'nadam' is not one of ['sgd', 'adagrad', 'adam', 'adamw', 'rmsprop', 'lbfgs']",
        "optim.name must be one of 'sgd', 'adagrad', 'adam', 'adamw', 'rmsprop', 'lbfgs' "
        "(got 'nadam')",
        id="not-a-choice",
    ),
    pytest.param(
        '[model]\nname = "mlp"\nhidden = [64, 0.5]\n',
        "0.5 is not of type 'integer'",
        "model.hidden must be a list of integers (got [64, 0.5])",
        id="float-in-int-list",
    ),
    pytest.param(
        '[model]\nname = "mlp"\ndepth = 3\n',
        "('depth' was unexpected)",
        "model.depth is not a key of model.name = 'mlp' (its keys: hidden, dropout, "
        "num_classes, init, init_from, init_allow_missing, init_allow_unexpected, freeze)",
        id="another-familys-key",
    ),
    pytest.param(
        "[model]\nwidths = [8]\n",
        "('widths' was unexpected)",
        "model.widths is not a key of model.name = 'linear'",
        id="a-key-of-no-linear-model",
    ),
    pytest.param(
        '[model]\nname = "resnet"\n',
        "'resnet' does not match ':'",
        "model.name must be linear, mlp, cnn, gpt, transformers or package.module:factory "
        "(got 'resnet')",
        id="unknown-family",
    ),
    pytest.param(
        "[optim]\nlr = 0\n",
        "0 is less than or equal to the minimum of 0",
        "optim.lr must be > 0 (got 0)",
        id="lr-zero",
    ),
    pytest.param(
        "[optim]\nmomentum = 1.0\n",
        "1.0 is greater than or equal to the maximum of 1",
        "optim.momentum must be in [0, 1) (got 1.0)",
        id="momentum-one",
    ),
    pytest.param(
        "train = 3\n",
        "3 is not of type 'object'",
        "[train] must be a table of keys (got 3)",
        id="section-not-a-table",
    ),
]


@pytest.mark.parametrize(("toml", "schema_says", "loader_says"), REFUSED)
def test_schema_and_loader_refuse_the_same(
    tmp_path: Path, toml: str, schema_says: str, loader_says: str
) -> None:
    errors = schema_errors(tomllib.loads(toml))
    assert any(schema_says in e for e in errors), errors
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert loader_says in str(info.value)
