"""The pipeline's prep step with ``data.cluster.nodes`` set: it creates the prep RayJob on kmock's fake API
(as the training steps create theirs) and waits for it; the test plays KubeRay, running the job's
entrypoint — the real driver, ``kubellm prep`` on a local Ray — with the head pod's environment. Success
brings the prepared dataset back from the shared volume, with the driver's MLflow logging in the step's
run; a failed RayJob fails the step (and its MLflow run) with one line naming the job."""

from __future__ import annotations

import functools
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubellm.config import load_config
from kubellm.config.params import to_param
from kubellm.config.platform import QUEUE_LABEL
from kubellm.errors import ClusterError
from kubellm.k8s.podsecurity import check
from kubellm.k8s.schema import validate_against_crd
from kubellm.stages import STAGE_RUN_ENV, StageContext
from kubellm.stages import data as stage

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NS = "kubellm"
RJ = ("ray.io", "v1", NS, "rayjobs")


class KubeRay(threading.Thread):
    """Plays KubeRay for the one RayJob the step creates: runs its entrypoint (``driver=True``) with the
    head container's environment, then reports the outcome as KubeRay does; or just reports ``final``."""

    def __init__(self, api_client: Any, cwd: Path, final: dict[str, Any] | None = None) -> None:
        super().__init__(daemon=True)
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.cwd, self.final = cwd, final
        self.job: dict[str, Any] | None = None
        self.driver: subprocess.CompletedProcess | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.job = self._created()
            name = self.job["metadata"]["name"]
            self._status(name, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
            if self.final is not None:
                self._status(name, self.final)
                return
            head = self.job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
            env = {
                **os.environ,
                **{e["name"]: e["value"] for e in head["env"] if "value" in e},
                "RAY_AUTH_MODE": "disabled",
                "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            }
            self.driver = subprocess.run(
                shlex.split(self.job["spec"]["entrypoint"]),
                cwd=self.cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=400,
            )
            ok = self.driver.returncode == 0
            self._status(
                name,
                {
                    "jobDeploymentStatus": "Complete" if ok else "Failed",
                    "jobStatus": "SUCCEEDED" if ok else "FAILED",
                    **({} if ok else {"reason": "AppFailed", "message": self.driver.stderr[-300:]}),
                },
            )
        except BaseException as err:  # reported by finish(); the step stops waiting
            self.error = err
            if self.job is not None:
                self._status(self.job["metadata"]["name"], {"jobDeploymentStatus": "Failed", "message": repr(err)})

    def _created(self) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:  # 404 until the first RayJob declares the resource
                items = self.api.list_namespaced_custom_object(*RJ)["items"]
            except ApiException as err:
                if err.status != 404:
                    raise
                items = []
            if items:
                (job,) = items
                return job
            time.sleep(0.1)
        raise TimeoutError("no RayJob was created")

    def _status(self, name: str, status: dict[str, Any]) -> None:
        self.api.patch_namespaced_custom_object_status(*RJ, name, {"status": status})

    def finish(self) -> dict[str, Any]:
        self.join(420)
        assert self.error is None, self.error
        assert self.job is not None
        return self.job


@pytest.fixture()
def on_the_cluster(fake_api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The step's process: the shared PVC at tmp_path/pvc, the fake API as the cluster, a KFP run id."""
    import kubellm.k8s.jobspec as jobspec
    import kubellm.k8s.training_job as tj

    monkeypatch.setattr(jobspec, "SHARED_MOUNT", str(tmp_path / "pvc"))
    monkeypatch.setattr(
        tj, "run_prep_rayjob", functools.partial(tj.run_prep_rayjob, api_client=fake_api.api_client(), poll_s=0.2)
    )
    monkeypatch.setenv("KUBELLM_KFP_RUN_ID", "kfp-run-1")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    return fake_api


def _config(tmp_path: Path, *overrides: str):
    corpus = tmp_path / "pvc" / "corpus"
    corpus.mkdir(parents=True)
    for i in range(3):
        with (corpus / f"part-{i}.jsonl").open("w") as f:
            for j in range(40):
                f.write(
                    json.dumps(
                        {
                            "text": f"Document {i}-{j}: the quick brown fox jumps over the lazy dog "
                            f"{j} times, then {i} more, and writes it down."
                        }
                    )
                    + "\n"
                )
    return load_config(
        REPO / "configs" / "cluster-ray.yaml",
        [
            f"data.sources=[{{uri: '{corpus}/*.jsonl', text_field: text}}]",
            "data.block_size=32",
            "data.tokenizer.vocab_size=300",
            "data.cluster.nodes=2",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "platform.queue_name=team-a",
            *overrides,
        ],
    )


@pytest.mark.timeout(600)  # the driver starts a local Ray and prepares on it
def test_prep_step_runs_the_prep_rayjob_and_brings_the_dataset_back(on_the_cluster, tmp_path: Path) -> None:
    from kubellm.data.format import open_prepared
    from kubellm.tracking.connect import mlflow_client

    cfg = _config(tmp_path)
    kuberay = KubeRay(on_the_cluster.api_client(), tmp_path)
    kuberay.start()
    ctx = StageContext.from_param(to_param(cfg.tracking), str(tmp_path))
    out = stage.prep(to_param(cfg.data), tmp_path / "artifact", ctx, platform=to_param(cfg.platform), run_name=cfg.name)
    job = kuberay.finish()
    assert kuberay.driver is not None and kuberay.driver.returncode == 0, kuberay.driver.stderr[-2000:]

    # the job: as the training engines' (schema, Pod Security, Kueue on the job, prep placement, the PVC)
    assert validate_against_crd(job) == [] and check(job) == []
    assert job["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "prep"
    (workers,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == 2
    (w,) = workers["template"]["spec"]["containers"]
    assert w["securityContext"]["allowPrivilegeEscalation"] is False and w["resources"]["requests"]["cpu"] == "16"
    argv = shlex.split(job["spec"]["entrypoint"])
    shared_out = Path(argv[argv.index("--out") + 1])
    assert shared_out.is_relative_to(tmp_path / "pvc" / "runs" / cfg.name)
    head_env = {
        e["name"]: e.get("value")
        for e in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    }

    # the dataset: what the driver wrote on the shared volume, now the step's artifact
    ds, on_pvc = open_prepared(tmp_path / "artifact"), open_prepared(shared_out)
    assert ds.manifest == on_pvc.manifest and ds.stats()["records_out"] == 120
    assert out.values["result"].manifest.fingerprint == on_pvc.manifest.fingerprint
    assert out.metrics["records_out"] == 120.0 and out.report_md.endswith((shared_out / "report.md").read_text())
    assert (tmp_path / "artifact" / "shards.json").is_file()

    # MLflow: the driver logged into this step's run, which the step then closed
    run = mlflow_client(cfg.tracking, str(tmp_path))[0].get_run(head_env[STAGE_RUN_ENV])
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "prep"
    assert run.data.tags["prep.job"] == f"RayJob/{job['metadata']['name']}"
    assert (
        run.data.metrics["data_records_out"] == 120.0 and run.data.params["data.fingerprint"] == ds.manifest.fingerprint
    )


def test_a_failed_prep_rayjob_fails_the_step_in_one_line(on_the_cluster, tmp_path: Path) -> None:
    from kubellm.tracking.connect import mlflow_client

    cfg = _config(tmp_path)
    kuberay = KubeRay(
        on_the_cluster.api_client(),
        tmp_path,
        final={
            "jobDeploymentStatus": "Failed",
            "jobStatus": "FAILED",
            "reason": "AppFailed",
            "message": "Job entrypoint command failed with exit code 2, last available logs:\nerror: data.sources[0]: "
            "no files match",
        },
    )
    kuberay.start()
    ctx = StageContext.from_param(to_param(cfg.tracking), str(tmp_path))
    with pytest.raises(ClusterError) as info:
        stage.prep(to_param(cfg.data), tmp_path / "artifact", ctx, platform=to_param(cfg.platform), run_name=cfg.name)
    job = kuberay.finish()
    name = job["metadata"]["name"]
    assert str(info.value) == (
        f"RayJob {NS}/{name} failed: AppFailed: Ray job FAILED: Job entrypoint command failed "
        f"with exit code 2, last available logs: error: data.sources[0]: no files match"
    )
    assert "\n" not in str(info.value) and not (tmp_path / "artifact").exists()
    client, _ = mlflow_client(cfg.tracking, str(tmp_path))
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["stage"] == "prep"


def test_instruction_prep_copies_only_the_tokenizer_and_checks_what_the_job_left(
    on_the_cluster, tmp_path: Path
) -> None:
    """The reused tokenizer (here a model directory's) reaches the job on the PVC without the weights; a
    RayJob that reports success but left no prepared dataset fails the step in one line naming the folder."""
    from kubellm.errors import DataError

    model = tmp_path / "model"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (model / name).write_text("{}")
    cfg = _config(
        tmp_path,
        "instruct_data.cluster.nodes=1",
        "instruct_data.engine=ray",
        "instruct_data.cluster.shared_pvc=kubellm-shared",
        "tracking.enabled=false",
    )
    kuberay = KubeRay(
        on_the_cluster.api_client(), tmp_path, final={"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    )
    kuberay.start()
    ctx = StageContext.from_param(to_param(cfg.tracking), str(tmp_path))
    with pytest.raises(DataError, match=r"/output: not a prepared dataset \(no manifest.json"):
        stage.prep(
            to_param(cfg.instruct_data),
            tmp_path / "artifact",
            ctx,
            stage="prep_instruct",
            tokenizer_dir=model,
            platform=to_param(cfg.platform),
            run_name=cfg.name,
        )
    job = kuberay.finish()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[argv.index("--section") + 1] == "instruct_data"
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "prep_instruct"
    tok = Path(argv[argv.index("--tokenizer") + 1])
    assert tok.is_relative_to(tmp_path / "pvc" / "runs" / cfg.name)
    assert sorted(p.name for p in tok.iterdir() if not p.name.startswith(".")) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not (tmp_path / "artifact").exists()


def test_without_the_platform_section_the_step_refuses_in_one_line(tmp_path: Path) -> None:
    from kubellm.errors import ConfigError

    cfg = _config(tmp_path, "tracking.enabled=false")
    with pytest.raises(ConfigError, match=r"^prep: cluster.nodes = 2 prepares in a RayJob, .* none was given"):
        stage.prep(to_param(cfg.data), tmp_path / "o", StageContext.from_param(to_param(cfg.tracking), str(tmp_path)))


def test_the_compiled_prep_step_carries_the_platform_and_mounts_the_shared_pvc(tmp_path: Path) -> None:
    """The step's pod mounts the PVC the RayJob writes to (even where its placement does not) and gets the
    compile-time platform section and run name it launches the job with."""
    from kubellm.pipelines._runner import compile_all

    cfg = load_config(REPO / "configs" / "cluster-ray.yaml", ["platform.stages.prep.pvcs=[]"])
    (path,) = compile_all(cfg, tmp_path, ["llm-lifecycle"], components=False)
    spec, platform = yaml.safe_load_all(path.read_text())
    (mount,) = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-prepare-data"]["pvcMount"]
    assert (mount["mountPath"], mount["constant"]) == ("/mnt/kubellm", "kubellm-shared")
    (task,) = [
        t
        for c in spec["components"].values()
        for n, t in c.get("dag", {}).get("tasks", {}).items()
        if n == "prepare-data"
    ]
    given = task["inputs"]["parameters"]
    assert given["run_name"]["runtimeValue"]["constant"] == "llm-ray"
    assert given["platform"]["runtimeValue"]["constant"]["stages"]["prep"]["resources"]["cpu_request"] == "16"
