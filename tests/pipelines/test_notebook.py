"""examples/quickstart.ipynb, executed end to end by a real Jupyter kernel, submitting to the KFP stand-in."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from kfp_standin import KfpStandIn

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)  # a Jupyter kernel runs a whole pipeline (as test_api's example run)
def test_quickstart_notebook_runs_and_submits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    with KfpStandIn(multi_user=True, tokens={"nb-token"}) as kfp:
        # The kernel inherits this process's environment: the venv's commands first on PATH, a few
        # training steps, and Kubeflow's standard endpoint variables pointing at the stand-in.
        monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("KUBELLM_QUICKSTART_STEPS", "4")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("KF_PIPELINES_ENDPOINT", kfp.url)
        monkeypatch.setenv("KFP_EXISTING_TOKEN", "nb-token")
        monkeypatch.setenv("KFP_NAMESPACE", "team-a")
        NotebookClient(
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
        assert kfp.state.problems == []
        runs = list(kfp.state.runs.values())

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "gate: " in text and "submitted llm-lifecycle" in text and "in team-a" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the loss curve is shown inline"
    assert [r["_namespace"] for r in runs] == ["team-a"]
    assert (tmp_path / "quickstart-work" / "dist" / "llm-lifecycle.yaml").is_file()
    assert (tmp_path / "quickstart-work" / "mlflow.db").is_file()  # every step tracked
