"""raymb's floors: imports run one way, bottom to top (docs/design.md, "Layers"). A module may
import its own floor and those below it, never one above: no circles, nothing reaching up.
Read from the source text (ast), so an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "raymb"

FLOORS = [
    # the ground floor: what every other floor may use
    ("errors", "files", "version", "timeline", "storage", "code"),
    ("config",),  # TOML in, frozen sections out
    ("core",),  # pure torch: plan arithmetic, order, step, sync, loss, optim, rng, noise
    ("models",),
    ("data",),  # columns, checks, collate, augment, prepare, manifest, arrivals
    ("load",),  # a config and its manifests, read once
    ("rundir",),  # the run directory's format: checkpoints, run.json, status, lock, sweep files
    ("worker",),  # the session seam, specs, the loop, feed, metrics
    ("driver",),  # preflight, cluster, run, tune, lr-find, local, launch, the report
    ("tools",),  # eval, predict, sample, export
    ("cli", "online", "__init__", "__main__"),
]
LEVEL = {name: i for i, names in enumerate(FLOORS) for name in names}


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "raymb":
        return None
    return LEVEL[parts[1] if len(parts) > 1 else "__init__"]


def _imports(path: Path) -> list[str]:
    """Every raymb module the file imports (`from raymb import storage` is raymb.storage), at the
    top or inside a function; not those under `if TYPE_CHECKING:`."""
    found = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # names for type hints only are no import at run time
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                as_module = PACKAGE.parent / (candidate.replace(".", "/") + ".py")
                is_package = (PACKAGE.parent / candidate.replace(".", "/")).is_dir()
                found.append(candidate if as_module.exists() or is_package else node.module)
    return [m for m in found if m == "raymb" or m.startswith("raymb.")]


def test_no_import_runs_up_a_floor() -> None:
    up = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        here = _floor(name)
        for imported in _imports(path):
            if _floor(imported) > here:
                up.append(f"{name} imports {imported}")
    assert not up, "imports that run up a floor:\n" + "\n".join(up)


def test_every_module_has_a_floor() -> None:
    for path in PACKAGE.iterdir():
        name = path.stem if path.suffix == ".py" else path.name
        if name.startswith((".", "_")) and name not in ("__init__", "__main__"):
            continue
        if path.suffix == ".py" or path.is_dir():
            assert name in LEVEL, f"raymb/{path.name} has no floor in this test's FLOORS"


def test_no_import_circles() -> None:
    """Within a floor too: no module reaches itself through the modules it imports."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = {m for m in _imports(path) if m != name}
    circles = []
    for start in graph:
        stack, seen = [(start, (start,))], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start and len(trail) > 1:
                    circles.append(" -> ".join((*trail, start)))
                elif nxt not in seen and nxt.startswith(start.rsplit(".", 1)[0]):
                    seen.add(nxt)
                    stack.append((nxt, (*trail, nxt)))
    assert not circles, "import circles:\n" + "\n".join(sorted(set(circles)))
