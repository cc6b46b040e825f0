"""Build a small text classification set from this machine's Python: the first paragraph of
each docstring in two areas of the standard library, labelled by area.

    label "files":   os, shutil, pathlib, glob, tempfile, zipfile, tarfile, ... (files, paths)
    label "numbers": math, statistics, random, fractions, decimal, ... (arithmetic)

Each docstring is taken once (the same text under two names is one row), the shorter class
is kept whole and the larger cut to at most 1.5 times it, and the rows are written to
data.csv (columns text, label) in a seeded shuffle. Usage: python make_data.py [OUT.csv]
"""

from __future__ import annotations

import csv
import importlib
import inspect
import random
import sys

AREAS = {
    "files": [
        "os", "os.path", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "filecmp",
        "stat", "zipfile", "tarfile", "gzip", "bz2", "lzma", "io", "fileinput", "zipimport",
    ],
    "numbers": [
        "math", "cmath", "statistics", "random", "fractions", "decimal", "numbers",
        "operator", "heapq", "bisect", "array", "struct", "secrets", "colorsys",
    ],
}  # fmt: skip


def docstrings(module_name: str) -> list[str]:
    """The first paragraph of the module's own public functions', classes' and methods'
    docstrings, on one line."""
    module = importlib.import_module(module_name)
    found = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) not in (
            module_name,
            module.__name__,
            "_" + module_name,
        ):
            continue
        found.append(obj)
        if inspect.isclass(obj):
            found += [m for n, m in vars(obj).items() if not n.startswith("_")]
    texts = []
    for obj in found:
        doc = inspect.getdoc(obj) if callable(obj) or inspect.isclass(obj) else None
        if doc:
            text = " ".join(doc.strip().split("\n\n")[0].split())
            if 20 <= len(text) <= 400:
                texts.append(text)
    return texts


def main(out: str = "data.csv") -> None:
    seen: set[str] = set()
    rows: dict[str, list[str]] = {}
    for label, modules in AREAS.items():
        rows[label] = []
        for name in modules:
            for text in docstrings(name):
                if text not in seen:
                    seen.add(text)
                    rows[label].append(text)
    rng = random.Random(0)
    cap = int(1.5 * min(len(texts) for texts in rows.values()))
    table = []
    for label, texts in rows.items():
        rng.shuffle(texts)
        table += [(text, label) for text in texts[:cap]]
    rng.shuffle(table)
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(table)
    counts = {label: sum(1 for _, lab in table if lab == label) for label in rows}
    print(f"wrote {len(table)} rows to {out}: {counts}")


if __name__ == "__main__":
    main(*sys.argv[1:])
