"""`kubellm run` on kfp's public surface: every private name of ``kfp.local`` it needs goes through one
adapter (``kubellm.pipelines._kfp_local``), which checks the installed kfp first; a kfp that moved or
lacks one of them stops `kubellm run` with one line naming the supported range, not a traceback."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from kubellm.pipelines import _kfp_local

REPO = Path(__file__).resolve().parents[2]
#: kfp's public modules: what ``from kfp…`` may name outside the adapter.
PUBLIC = {"kfp", "kfp.dsl", "kfp.compiler", "kfp.local", "kfp.kubernetes", "kfp.client", "kfp.components"}


def test_every_private_name_the_adapter_touches_exists_in_the_installed_kfp() -> None:
    for module, path in _kfp_local.PRIVATE:
        obj = importlib.import_module(module)
        for name in path.split("."):
            assert hasattr(obj, name), f"{module}:{path}"
            obj = getattr(obj, name)
    assert _kfp_local.missing_names() == []
    _kfp_local.check()


def test_no_other_module_imports_kfp_internals() -> None:
    """The adapter is the one place: elsewhere kfp is reached through its public modules only
    (``kfp_server_api`` is the API client package kfp's own ``Client`` returns objects of)."""
    allowed = PUBLIC | {"kfp_server_api"}
    offenders = []
    for path in [*REPO.glob("pipelines/*.py"), *REPO.glob("components/*.py"), *REPO.glob("src/kubellm/**/*.py")]:
        if path.name == "_kfp_local.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.startswith("kfp") and n not in allowed]
    assert offenders == []


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from kubellm.cli.app import main

    with pytest.raises(SystemExit) as exited:
        main(["run", "--config", str(REPO / "configs" / "local.yaml"), "--set", f"workdir={tmp_path}", "--quiet"])
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "removed",
    [("kfp.local.cache", "_ARTIFACT_MARKER"), ("kfp.local.orchestrator.task_executor", "execute_single_task")],
)
def test_a_kfp_without_a_name_the_adapter_uses_stops_kubellm_run_in_one_line(
    removed: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module, name = removed
    monkeypatch.delattr(importlib.import_module(module), name)
    code, err = _run(tmp_path, capsys)
    assert code != 0
    assert err.strip().splitlines() == [
        f"error: kubellm run needs kfp>=2.17.0,<2.18.0 as released; the installed kfp {__import__('kfp').__version__} "
        f"lacks {module}:{name}: pip install --force-reinstall 'kfp>=2.17.0,<2.18.0'"
    ]
    assert "Traceback" not in err and not (tmp_path / "runs").exists()  # nothing started


def test_a_kfp_outside_the_supported_range_stops_kubellm_run_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kfp

    monkeypatch.setattr(kfp, "__version__", "2.18.1")
    code, err = _run(tmp_path, capsys)
    assert code != 0 and err.strip().splitlines() == [
        "error: kubellm run needs kfp>=2.17.0,<2.18.0 (its local runner's internals); kfp 2.18.1 is installed: "
        "pip install 'kfp>=2.17.0,<2.18.0'"
    ]
    assert not (tmp_path / "runs").exists()
