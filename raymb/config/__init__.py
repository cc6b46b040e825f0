"""The run configuration: one frozen, keyword-only pydantic dataclass per TOML section.

pydantic checks types and bounds as a config is built (and writes the JSON Schema editors
check a config file against); every user mistake in a config file or a `--set` override
surfaces here as a one-line `ConfigError` naming the key and the value it got, before Ray
starts. Building a config reads nothing; load.py reads the TOML file and the --set
overrides, and raymb.load (above config and data) adds a prepared folder's manifest.

- build.py: the pydantic plumbing (`section`, `build`) and the one-line errors
- sections.py: the sections but [model] and [data]; model.py: [model], one class per family;
  data.py: [data] and [data.augment]
- config.py: `Config`, the sections together; load.py: the TOML file and --set
- toml.py: `to_toml` (--print-config); schema.py: `json_schema`, and `markdown` (docs/config.md)
"""

from raymb.config.build import MAX_EPOCHS, MAX_SEED, MAX_STEPS
from raymb.config.config import Config
from raymb.config.data import DataSection
from raymb.config.load import parse_override, read_toml
from raymb.config.model import (
    BUILTIN_MODELS,
    CnnModel,
    FactoryModel,
    GptModel,
    LinearModel,
    MlpModel,
    Model,
    ModelSection,
    TransformersModel,
)
from raymb.config.schema import json_schema, markdown
from raymb.config.sections import (
    RUN_NAME,
    CheckpointSection,
    EarlyStopping,
    FaultSection,
    LogSection,
    OptimSection,
    OuterSection,
    RunSection,
    ScaleSection,
    StorageSection,
    TrainSection,
    parse_bytes,
    plain_name,
)
from raymb.config.toml import to_toml

__all__ = [
    "BUILTIN_MODELS",
    "MAX_EPOCHS",
    "MAX_SEED",
    "MAX_STEPS",
    "RUN_NAME",
    "CheckpointSection",
    "CnnModel",
    "Config",
    "DataSection",
    "EarlyStopping",
    "FactoryModel",
    "FaultSection",
    "GptModel",
    "LinearModel",
    "LogSection",
    "MlpModel",
    "Model",
    "ModelSection",
    "OptimSection",
    "OuterSection",
    "RunSection",
    "ScaleSection",
    "StorageSection",
    "TrainSection",
    "TransformersModel",
    "json_schema",
    "markdown",
    "parse_bytes",
    "parse_override",
    "plain_name",
    "read_toml",
    "to_toml",
]
