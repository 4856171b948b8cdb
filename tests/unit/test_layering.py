"""The layers hold: every import of kubellm's own modules points down (function-level imports included),
the library never imports kfp, no module-level import circles, and every module imports on its own in
any order (what a KFP task process or a training pod does first)."""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"

#: The one statement of kubellm's layering: each layer (a top-level module or subpackage of ``kubellm``)
#: and the layers right below it that it may import. A layer may import what those may import, and so
#: on down; nothing else. Bottom: errors, log, markdown, fsutil, config. Middle: models (loading,
#: precision, tensor checks), tracking, data, train, evaluate, serve, k8s. Top: stages (and the run
#: summary), then the components, the pipelines and the CLI.
LAYERS: dict[str, set[str]] = {
    "errors": set(),
    "log": set(),
    "markdown": set(),
    "yamlio": set(),
    "fsutil": {"errors"},
    "config": {"errors", "markdown"},
    "pipeline_params": {"config"},
    "models": {"config", "fsutil", "log"},
    "tracking": {"models"},
    "data": {"tracking"},
    "train": {"data"},
    "evaluate": {"train"},
    "serve": {"models", "tracking"},
    "k8s": {"data", "serve", "train", "yamlio"},  # data: the tokenizer copied to the PVC; train: the memory plan
    "stages": {"evaluate", "k8s"},
    "summary": {"tracking"},
    "components": {"stages"},
    "pipelines": {"components", "pipeline_params"},
    "cli": {"pipelines", "summary"},
}
#: Where the library's and the KFP side's modules are, as (folder, package name).
ROOTS = (
    (SRC / "kubellm", "kubellm"),
    (REPO / "components", "kubellm.components"),
    (REPO / "pipelines", "kubellm.pipelines"),
)


def _below(layer: str) -> set[str]:
    """Every layer ``layer`` may import, itself included."""
    seen, todo = {layer}, [layer]
    while todo:
        for low in LAYERS[todo.pop()]:
            if low not in seen:
                seen.add(low)
                todo.append(low)
    return seen


def _layer(name: str, modules: Mapping[str, str]) -> str | None:
    """``kubellm.train.loop`` -> ``train``; ``kubellm`` and a name in it that is not a module
    (``kubellm.__version__``) -> ``None``: the package root, below everything."""
    parts = name.split(".")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] not in LAYERS and name not in modules):
        return None
    return parts[1]


def _package_modules() -> dict[str, Path]:
    mods = {}
    for root, package in ROOTS:
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            if "compiled" not in parts:
                mods[".".join((package, *parts))] = path
    return mods


def imported_modules(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of a kubellm module anywhere in ``source`` (the module
    ``module``): at module level, inside functions, under ``if TYPE_CHECKING``, relative ones resolved.
    ``from a import b`` counts as importing ``a.b`` (which is ``a`` itself when ``b`` is a name in it)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([base] if base else [])])
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return [(line, name) for line, name in out if name == "kubellm" or name.startswith("kubellm.")]


def upward_imports(sources: Mapping[str, str], packages: frozenset[str] = frozenset()) -> list[str]:
    """Every import in ``sources`` (module name -> source text) that goes up or sideways in
    :data:`LAYERS`, and every module of a layer :data:`LAYERS` does not place, one line each.
    ``packages``: the modules that are packages (``__init__``), for relative imports."""
    bad = []
    for module, source in sorted(sources.items()):
        layer = _layer(module, sources)
        if layer is not None and layer not in LAYERS:
            bad.append(f"{module}: layer {layer!r} is not in LAYERS; place it there")
            continue
        allowed = _below(layer) if layer else set()
        for line, name in imported_modules(module, source, module in packages):
            target = _layer(name, sources)
            if target is not None and target not in allowed:
                bad.append(f"{module}:{line} imports {name} ({layer or 'kubellm'} may not import {target})")
    return bad


def _module_level_imports(path: Path) -> set[str]:
    """Names imported at module level (what an import circle is made of)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted((SRC / "kubellm").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def test_the_layers_are_a_hierarchy() -> None:
    """LAYERS itself has no circle (else "below" would mean nothing) and names only known layers."""
    for layer, lower in LAYERS.items():
        assert lower <= LAYERS.keys(), layer
        assert all(layer not in _below(low) for low in lower), f"{layer} is below itself"


def test_every_import_points_down_function_level_imports_included() -> None:
    mods = _package_modules()
    packages = frozenset(m for m, p in mods.items() if p.name == "__init__.py")
    bad = upward_imports({m: p.read_text(encoding="utf-8") for m, p in mods.items()}, packages)
    assert not bad, "\n".join(bad)


def test_the_layer_check_catches_an_upward_import_anywhere(tmp_path: Path) -> None:
    """The checker fails on an upward import at module level, inside a function, under TYPE_CHECKING
    and relative, on a sideways one, and on a module of an unknown layer; downward imports pass."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from typing import TYPE_CHECKING\n"
        "from kubellm.config.run import RunConfig\n"  # down: fine
        "import kubellm.cli.app\n"  # up, module level
        "if TYPE_CHECKING:\n"
        "    from kubellm.stages.base import StageContext\n"  # up, for types only
        "def load():\n"
        "    from kubellm.train.loop import TrainResult\n"  # up, inside a function
        "    from kubellm import stages\n"  # up, as a name
        "    from ..serve import engine\n"  # sideways, relative
        "    return TrainResult\n"
    )
    found = upward_imports({"kubellm.tracking.bad": bad.read_text()})
    assert [line.split(" (")[0] for line in found] == [
        "kubellm.tracking.bad:3 imports kubellm.cli.app",
        "kubellm.tracking.bad:5 imports kubellm.stages.base.StageContext",
        "kubellm.tracking.bad:7 imports kubellm.train.loop.TrainResult",
        "kubellm.tracking.bad:8 imports kubellm.stages",
        "kubellm.tracking.bad:9 imports kubellm.serve.engine",
    ]
    assert upward_imports({"kubellm.stages.good": bad.read_text()}) == [
        "kubellm.stages.good:3 imports kubellm.cli.app (stages may not import cli)"
    ]
    assert upward_imports({"kubellm.newpkg.mod": "import json\n", "kubellm.newmod": ""}) == [
        "kubellm.newmod: layer 'newmod' is not in LAYERS; place it there",
        "kubellm.newpkg.mod: layer 'newpkg' is not in LAYERS; place it there",
    ]


def test_the_library_never_imports_kfp() -> None:
    offenders = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{name}: {m}" for m in mods if m == "kfp" or m.startswith("kfp.")]
    assert not offenders


def test_no_module_level_import_circles() -> None:
    mods = _modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {
        m: {o for n in _module_level_imports(p) if (o := owner(n)) and o != m and not m.startswith(f"{o}.")}
        for m, p in mods.items()
    }  # a module importing its own package's __init__ is not a circle
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import circle: " + " -> ".join([*stack[stack.index(n) :], n]))
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
