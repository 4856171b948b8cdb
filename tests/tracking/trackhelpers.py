"""Helpers of the tracking tests (a module of its own: every test folder has a ``conftest``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

_DUMP = textwrap.dedent("""
    import json, sys
    from mlflow import MlflowClient
    uri, experiment, model = sys.argv[1:4]
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.get_experiment_by_name(experiment)
    runs = {}
    for r in (c.search_runs([exp.experiment_id]) if exp else []):
        runs[r.info.run_id] = {"name": r.info.run_name, "status": r.info.status, "params": r.data.params,
                               "metrics": r.data.metrics, "tags": r.data.tags,
                               "history": {k: [(m.step, m.value) for m in c.get_metric_history(r.info.run_id, k)]
                                           for k in r.data.metrics},
                               "artifacts": sorted(a.path for a in c.list_artifacts(r.info.run_id))}
    versions = []
    if model != "-":
        for found in c.search_model_versions(f"name = '{model}'"):
            mv = c.get_model_version(model, found.version)  # search results leave aliases out
            versions.append({"version": int(mv.version), "aliases": sorted(mv.aliases), "tags": mv.tags,
                             "run_id": mv.run_id})
        versions.sort(key=lambda v: v["version"])
    print(json.dumps({"runs": runs, "versions": versions}))
""")


def read_back(uri: str, experiment: str, model: str = "-") -> dict[str, Any]:
    """What the store holds, read by ``MlflowClient`` in a separate Python process."""
    env = {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    out = subprocess.run(
        [sys.executable, "-c", _DUMP, uri, experiment, model],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
