"""A stand-in for KFP 2.17's MLflow plugin (KEP-12862), as strict as the real one about the runs it makes.

What the plugin does around a KFP run, and this class does against a real MLflow server:

- the API server opens one parent run per KFP run in the configured experiment (:meth:`open`);
- the driver opens a nested run per task (``mlflow.parentRunId`` = the parent, named after the task) and
  hands the task container ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_ID``, ``MLFLOW_RUN_ID`` (that run),
  plus ``MLFLOW_WORKSPACE``/``MLFLOW_TRACKING_AUTH`` when configured (:meth:`start`);
- the launcher ends the task's run FINISHED or FAILED when the container exits (:meth:`end`);
- the API server closes the parent and any nested run still open when the KFP run ends (:meth:`close`);
- a retried KFP run reopens them: the same runs, RUNNING again, handed to the same tasks.

As a :class:`kubellm.pipelines._runner.TaskEnvironment` it plugs into ``kubellm run``; as a script
(``python mlflow_plugin.py STATE.json -- kubellm run …``) it runs one ``kubellm run`` under the plugin,
keeping its runs in ``STATE.json`` so a second invocation is the retried KFP run.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any


class MlflowPluginStandIn:
    def __init__(
        self, uri: str, experiment_id: str, state: dict[str, Any] | None = None, extra_env: dict[str, str] | None = None
    ) -> None:
        from mlflow import MlflowClient

        self.uri, self.experiment_id = uri, experiment_id
        self.client = MlflowClient(uri)
        self.state = state if state is not None else {"parent": None, "tasks": {}, "handed": []}
        self.extra_env = dict(extra_env or {})
        self._lock = threading.Lock()

    def open(self, kfp_run_name: str) -> str:
        """The parent run of the KFP run (reopened when this is a retry)."""
        if self.state["parent"] is None:
            run = self.client.create_run(self.experiment_id, run_name=kfp_run_name, tags={"kfp.plugin": "standin"})
            self.state["parent"] = run.info.run_id
        else:
            self.client.update_run(self.state["parent"], status="RUNNING")
        return self.state["parent"]

    def start(self, task: str) -> dict[str, str]:
        with self._lock:
            run_id = self.state["tasks"].get(task)
            if run_id is None:
                run_id = self.client.create_run(
                    self.experiment_id,
                    run_name=task,
                    tags={"mlflow.parentRunId": self.state["parent"], "kfp.task": task},
                ).info.run_id
                self.state["tasks"][task] = run_id
            else:  # the retried KFP run reopens the task's run
                self.client.update_run(run_id, status="RUNNING")
            self.state["handed"].append(task)
        return {
            "MLFLOW_TRACKING_URI": self.uri,
            "MLFLOW_EXPERIMENT_ID": self.experiment_id,
            "MLFLOW_RUN_ID": run_id,
            **self.extra_env,
        }

    def end(self, task: str, ok: bool) -> None:
        self.client.set_terminated(self.state["tasks"][task], "FINISHED" if ok else "FAILED")

    def close(self, ok: bool) -> None:
        for run_id in self.state["tasks"].values():
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, "KILLED")
        self.client.set_terminated(self.state["parent"], "FINISHED" if ok else "FAILED")


def main(argv: list[str]) -> int:
    """``STATE.json -- kubellm-args…``: one ``kubellm run`` under the plugin (its exit code)."""
    state_file, args = Path(argv[0]), argv[argv.index("--") + 1 :]
    doc = json.loads(state_file.read_text())
    plugin = MlflowPluginStandIn(doc["uri"], doc["experiment_id"], doc.get("state"), doc.get("extra_env"))
    plugin.open(doc["kfp_run_name"])
    # the server and experiment the plugin is configured with are the same for every task: the runner
    # (KFP's backend here) sees them too, as its run summary reads the tree back
    os.environ.update({"MLFLOW_TRACKING_URI": plugin.uri, "MLFLOW_EXPERIMENT_ID": plugin.experiment_id})
    from kubellm.cli.app import main as kubellm
    from kubellm.pipelines._runner import TASK_ENVIRONMENTS

    TASK_ENVIRONMENTS.append(plugin)
    code = 0
    try:
        kubellm(args)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    plugin.close(code == 0)
    state_file.write_text(json.dumps({**doc, "state": plugin.state}))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
