"""The package structure (issue 16): packages depend one way and no module imports itself in a circle.

Bottom to top: ``errors``, ``config``, ``utils``; ``diffusion``, ``models``, ``pipeline``; ``diffusers_pipeline``
(ParaUni as a diffusers pipeline); ``scoring`` (CLIP and
GenEval's rules, shared by ``rl`` and ``eval``); ``training``, ``analysis``, ``eval``, ``rl``; ``world``,
``serve``, ``config_reference``; ``cli`` on top. ``ALLOWED`` lists what each may import. Two checks:

* the source, read with ``ast``: every import, also those inside functions, so a lazy import cannot hide a
  wrong direction or a circle;
* a fresh interpreter per package that imports all of its modules with the packages it may not use blocked
  (a ``sys.meta_path`` finder that raises on them), so what really runs at import time agrees.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC / "parauni"

BASE = {"errors", "config", "utils"}
CORE = BASE | {"diffusion", "models", "pipeline"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "utils": {"errors"},
    "diffusion": {"errors", "config", "utils"},
    "models": BASE | {"diffusion"},
    "pipeline": BASE | {"diffusion", "models"},
    "diffusers_pipeline": CORE,
    "scoring": {"errors", "utils"},
    "training": CORE,
    "analysis": CORE,
    "eval": CORE | {"scoring", "training"},
    "rl": CORE | {"scoring", "training"},
    "world": CORE | {"scoring", "training", "analysis", "eval", "rl"},
    "serve": CORE | {"scoring", "training", "analysis"},
    "config_reference": CORE | {"scoring", "training", "rl", "world"},
    "cli": CORE | {"diffusers_pipeline", "scoring", "training", "analysis", "eval", "rl", "world", "serve"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The parauni modules ``path`` imports anywhere in it (not under ``if TYPE_CHECKING``)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if in_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            stem = ".".join(base + ([node.module] if node.module else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        else:
            continue
        found |= {t for t in targets if t.startswith("parauni.") and t in known}
    return found - {name}


def top(module: str) -> str:
    return module.split(".")[1]


def test_packages_depend_one_way():
    known = modules()
    wrong = []
    for name, path in known.items():
        if name == "parauni":  # the public API: lazy names of every layer (parauni/__init__.py)
            continue
        mine = top(name)
        for target in imports(path, known):
            if top(target) != mine and top(target) not in ALLOWED[mine]:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports against the package order:\n" + "\n".join(wrong)


def test_every_package_has_a_place():
    assert {top(n) for n in modules() if n != "parauni"} == set(ALLOWED)


def test_no_import_circle():
    known = modules()
    graph = {name: imports(path, known) for name, path in known.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(circles)


BLOCKED_IMPORT = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    blocked = set(sys.argv[2].split(",")) - {""}

    class Block:
        def find_spec(self, name, path=None, target=None):
            parts = name.split(".")
            if parts[0] == "parauni" and len(parts) > 1 and parts[1] in blocked:
                raise ImportError(f"{name} is above {sys.argv[1]}: it may not import it")
            return None

    sys.meta_path.insert(0, Block())
    package = importlib.import_module("parauni." + sys.argv[1])
    for info in pkgutil.walk_packages(getattr(package, "__path__", []), package.__name__ + "."):
        if not info.name.endswith(".__main__"):  # running it would start the command
            importlib.import_module(info.name)
    """
)


@pytest.mark.slow
def test_each_package_imports_with_the_packages_above_it_blocked():
    def start(name: str) -> subprocess.Popen:
        blocked = ",".join(sorted(set(ALLOWED) - ALLOWED[name] - {name}))
        return subprocess.Popen(
            [sys.executable, "-c", BLOCKED_IMPORT, name, blocked],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    failed = {}
    names = sorted(ALLOWED)
    for i in range(0, len(names), 4):  # four interpreters at a time: each loads torch
        runs = {name: start(name) for name in names[i : i + 4]}
        for name, run in runs.items():
            out, _ = run.communicate(timeout=600)
            if run.returncode:
                failed[name] = out.strip().splitlines()[-1]
    assert not failed, failed
