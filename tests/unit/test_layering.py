"""The layers hold: the library never imports kfp, no module-level import circles, and every module
imports on its own in any order (what a KFP task process or a training pod does first)."""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted((SRC / "kubellm").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _module_level_imports(path: Path) -> set[str]:
    """Names imported at module level (imports inside functions are the lazy ones, not circles)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_the_library_never_imports_kfp() -> None:
    offenders = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name}: {m}" for m in mods if m == "kfp" or m.startswith("kfp.")]
    assert not offenders


def test_no_module_level_import_circles() -> None:
    mods = _modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: {o for n in _module_level_imports(p) if (o := owner(n)) and o != m and not m.startswith(f"{o}.")}
             for m, p in mods.items()}  # a module importing its own package's __init__ is not a circle
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import circle: " + " -> ".join([*stack[stack.index(n):], n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.slow
def test_every_module_imports_in_any_order() -> None:
    names = sorted(n for n in _modules() if not n.endswith(".__main__"))  # that one runs the CLI
    seed = random.randrange(1 << 30)
    shuffled = names[:]
    random.Random(seed).shuffle(shuffled)
    for order in (shuffled, names[::-1]):
        code = f"import importlib\nfor n in {order!r}:\n    importlib.import_module(n)\n"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"seed {seed}: {proc.stderr[-2000:]}"
