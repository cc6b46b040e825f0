"""docs/config.md is generated from the config's sections (`python -m raymb.config >
docs/config.md`) and is current: every section and key, with its type, default and docstring.
Plain Python, no Ray."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from raymb.config import Config, markdown
from raymb.config.model import FAMILIES

REPO = Path(__file__).resolve().parents[3]
DOC = REPO / "docs" / "config.md"


def test_docs_config_md_is_current() -> None:
    assert DOC.read_text() == markdown(), (
        "docs/config.md is stale: regenerate it with `python -m raymb.config > docs/config.md`"
    )


def test_python_m_raymb_config_writes_it() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "raymb.config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == markdown()
    assert "`python -m raymb.config > docs/config.md`" in proc.stdout.split("\n\n")[1]


def test_every_section_and_key_is_documented() -> None:
    text = markdown()
    sections = [(f.name, type(f.default_factory())) for f in dataclasses.fields(Config)]
    sections.append(("train.early_stopping", type(Config().train.early_stopping)))
    sections += [("model", cls) for cls in FAMILIES.values()]
    for name, cls in sections:
        assert f"\n## [{name}]\n" in text, name
        for key, f in cls.__pydantic_fields__.items():
            if dataclasses.is_dataclass(f.annotation):
                continue  # a table of its own: [train.early_stopping]
            assert f"\n- `{key}` = " in text, f"{name}.{key}"
            # Every key says what it does (a family's name: the title of its keys).
            assert f.description or key == "name" and name == "model", f"{name}.{key}"
    for tag in ("linear", "mlp", "cnn", "gpt", "package.module:factory"):
        assert f'\n### name = "{tag}"\n' in text
    assert "\n- `lr` = unset (a number > 0): Learning rate" in text
    assert "\n- `dropout` = `0.0` (a number in [0, 1)): Dropout rate" in text
