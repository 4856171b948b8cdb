"""The training-job launcher against kmock's stateful fake API server; the tests play the operator."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubellm.config import RunConfig
from kubellm.errors import ClusterError
from kubellm.k8s.client import load_api_client
from kubellm.k8s.training_job import build_job, launch, run_training_job

pytestmark = pytest.mark.integration

NS = "team-a"
PT = ("kubeflow.org", "v1", NS, "pytorchjobs")
RJ = ("ray.io", "v1", NS, "rayjobs")
POLL = 0.02


def _cond(kind: str, reason: str = "", message: str = "") -> dict[str, str]:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


class Operator(threading.Thread):
    """Plays the training operator: once the job exists (and ``when`` holds), sets each status in turn
    (a list of conditions, or a whole status mapping as KubeRay writes it)."""

    def __init__(
        self, api_client: Any, plural_ref: tuple[str, ...], name: str, statuses: list[Any], when=lambda obj: True
    ) -> None:
        super().__init__(daemon=True)
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.ref, self.name, self.statuses, self.when = plural_ref, name, statuses, when
        self.error: BaseException | None = None

    def run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    obj = self.api.get_namespaced_custom_object(*self.ref, self.name)
                    if self.when(obj):
                        break
                except ApiException as err:
                    if err.status != 404:
                        raise
                time.sleep(POLL)
            for conditions in self.statuses:
                status = conditions if isinstance(conditions, dict) else {"conditions": conditions}
                self.api.patch_namespaced_custom_object_status(*self.ref, self.name, {"status": status})
                time.sleep(POLL * 3)
        except BaseException as err:  # reported by finish()
            self.error = err

    def finish(self) -> None:
        self.join(10)
        assert self.error is None, self.error


@pytest.fixture()
def job(cluster_cfg: RunConfig) -> dict:
    return build_job("pytorchjob", "pretrain", cluster_cfg, "prepared", "runs/1", data_fingerprint="fp1")


def _creates(fake_api) -> int:
    import kmock

    return len(fake_api.emulator[kmock.action.CREATE])


def test_creates_and_waits_for_success(fake_api, job: dict, caplog: pytest.LogCaptureFixture) -> None:
    name = job["metadata"]["name"]
    operator = Operator(
        fake_api.api_client(),
        PT,
        name,
        [
            [_cond("Created", "PyTorchJobCreated")],
            [_cond("Created"), _cond("Running", "PyTorchJobRunning", "job is running")],
            [_cond("Created"), _cond("Succeeded", "PyTorchJobSucceeded", "job succeeded")],
        ],
    )
    operator.start()
    with caplog.at_level("INFO", logger="kubellm"):
        outcome = launch(job, NS, api_client=fake_api.api_client(), timeout_s=10, poll_s=POLL)
    operator.finish()
    assert (outcome.kind, outcome.name, outcome.namespace) == ("PyTorchJob", name, NS)
    assert outcome.created and not outcome.restarted
    assert "Running (PyTorchJobRunning job is running)" in outcome.conditions
    assert any("Succeeded" in line for line in outcome.conditions)
    assert "Running (PyTorchJobRunning job is running)" in caplog.text
    stored = fake_api.emulator.objects[next(iter(fake_api.emulator.objects))]
    assert stored["metadata"]["namespace"] == NS and stored["spec"] == job["spec"]
    assert _creates(fake_api) == 1


def test_second_launch_reattaches_and_creates_nothing(fake_api, job: dict) -> None:
    name = job["metadata"]["name"]
    api = fake_api.api_client()
    operator = Operator(api, PT, name, [[_cond("Running")], [_cond("Succeeded")]])
    operator.start()
    first = launch(job, NS, api_client=api, timeout_s=10, poll_s=POLL)
    operator.finish()
    second = launch(job, NS, api_client=api, timeout_s=10, poll_s=POLL)
    assert first.created and not second.created
    assert _creates(fake_api) == 1


def test_retried_step_reattaches_to_running_job(fake_api, job: dict) -> None:
    from kubernetes import client

    api = fake_api.api_client()
    running = {**job, "metadata": {**job["metadata"], "namespace": NS}, "status": {"conditions": [_cond("Running")]}}
    client.CustomObjectsApi(api).create_namespaced_custom_object(*PT, running)
    operator = Operator(api, PT, job["metadata"]["name"], [[_cond("Running"), _cond("Succeeded")]])
    operator.start()
    outcome = launch(job, NS, api_client=api, timeout_s=10, poll_s=POLL)
    operator.finish()
    assert not outcome.created
    assert _creates(fake_api) == 1  # the one this test made


def test_failed_job_fails_the_step_with_the_operator_reason(fake_api, job: dict) -> None:
    operator = Operator(
        fake_api.api_client(),
        PT,
        job["metadata"]["name"],
        [
            [_cond("Running")],
            [
                _cond("Running"),
                _cond(
                    "Failed", "PyTorchJobFailed", "PyTorchJob pretrain is failed because 1\nMaster replica(s) failed."
                ),
            ],
        ],
    )
    operator.start()
    with pytest.raises(ClusterError) as info:
        launch(job, NS, api_client=fake_api.api_client(), timeout_s=10, poll_s=POLL)
    operator.finish()
    message = str(info.value)
    assert f"PyTorchJob {NS}/{job['metadata']['name']} failed: PyTorchJobFailed: " in message
    assert "1 Master replica(s) failed." in message and "\n" not in message


def test_failed_job_of_same_name_is_replaced(fake_api, job: dict) -> None:
    from kubernetes import client

    api = fake_api.api_client()
    failed = {
        **job,
        "metadata": {**job["metadata"], "namespace": NS},
        "status": {"conditions": [_cond("Failed", "DeadlineExceeded")]},
    }
    client.CustomObjectsApi(api).create_namespaced_custom_object(*PT, failed)
    operator = Operator(
        api, PT, job["metadata"]["name"], [[_cond("Succeeded")]], when=lambda obj: not obj.get("status")
    )  # the new object, not the failed one
    operator.start()
    outcome = launch(job, NS, api_client=api, timeout_s=10, poll_s=POLL)
    operator.finish()
    assert outcome.created and outcome.restarted
    assert _creates(fake_api) == 2


def test_timeout_fails_clearly_and_leaves_the_job(fake_api, job: dict) -> None:
    operator = Operator(fake_api.api_client(), PT, job["metadata"]["name"], [[_cond("Running", "PyTorchJobRunning")]])
    operator.start()
    t0 = time.monotonic()
    with pytest.raises(
        ClusterError,
        match=r"did not finish within 0.5s \(last: Running \(PyTorchJobRunning\)\); "
        r"a retried step re-attaches",
    ):
        launch(job, NS, api_client=fake_api.api_client(), timeout_s=0.5, poll_s=POLL)
    operator.finish()
    assert time.monotonic() - t0 < 10  # gave up after its 0.5 s, not minutes later
    assert len(fake_api.emulator.objects) == 1


def test_trainjob_completes(fake_api, cluster_cfg: RunConfig) -> None:
    tj = build_job("trainjob", "finetune", cluster_cfg, "prepared", "runs/2", "org/base")
    ref = ("trainer.kubeflow.org", "v1alpha1", NS, "trainjobs")
    operator = Operator(fake_api.api_client(), ref, tj["metadata"]["name"], [[_cond("Complete", "JobsCompleted")]])
    operator.start()
    outcome = launch(tj, NS, api_client=fake_api.api_client(), timeout_s=10, poll_s=POLL)
    operator.finish()
    assert outcome.kind == "TrainJob" and outcome.created


def test_credentials_from_kubeconfig_and_clear_error_without(
    fake_api, cluster_cfg: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(ClusterError, match=r"no Kubernetes credentials: not in a pod .* no usable kubeconfig at "):
        load_api_client()
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": fake_api.url}}],
                "users": [{"name": "u", "user": {}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    cfg = cluster_cfg.model_copy(deep=True)
    cfg.platform.namespace = NS
    name = build_job("pytorchjob", "pretrain", cfg, "prepared", "runs/3")["metadata"]["name"]
    operator = Operator(fake_api.api_client(), PT, name, [[_cond("Succeeded")]])
    operator.start()
    outcome = run_training_job("pretrain", cfg, "prepared", "runs/3", poll_s=POLL)  # no api_client given
    operator.finish()
    assert outcome.name == name and outcome.created


def test_unreachable_api_is_one_line(job: dict) -> None:
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = "http://127.0.0.1:9"  # discard port: nothing listens
    cfg.retries = 0
    with pytest.raises(ClusterError, match=r"reading PyTorchJob team-a/.*: cannot reach the Kubernetes API"):
        launch(job, NS, api_client=client.ApiClient(cfg), timeout_s=1, poll_s=POLL)


# ------------------------------------------------------------------------------------ RayJob (KubeRay)


def _ray(deployment: str, job: str | None = None, reason: str | None = None, message: str | None = None) -> dict:
    """A RayJob status as KubeRay writes it (no conditions: jobDeploymentStatus and Ray's jobStatus)."""
    status = {"jobDeploymentStatus": deployment, "jobId": "pretrain-x-1"}
    status.update({k: v for k, v in (("jobStatus", job), ("reason", reason), ("message", message)) if v})
    return status


@pytest.fixture()
def rayjob(cluster_overrides: list[str], repo_root: Path) -> dict:
    from kubellm.config import load_config

    cfg = load_config(
        repo_root / "configs" / "local.yaml",
        [
            *cluster_overrides,
            "platform.distributed.pretrain.engine=rayjob",
            "platform.distributed.pretrain.procs_per_node=4",
        ],
    )
    return build_job(
        "rayjob", "pretrain", cfg, "prepared", "runs/1", data_fingerprint="fp1", env={"KUBELLM_STAGE_RUN_ID": "run-1"}
    )


def test_rayjob_creates_and_waits_for_success(fake_api, rayjob: dict, caplog: pytest.LogCaptureFixture) -> None:
    name = rayjob["metadata"]["name"]
    operator = Operator(
        fake_api.api_client(),
        RJ,
        name,
        [
            _ray("Initializing"),
            _ray("Running", "PENDING"),
            _ray("Running", "RUNNING"),
            _ray("Complete", "SUCCEEDED", message="Job finished successfully."),
        ],
    )
    operator.start()
    with caplog.at_level("INFO", logger="kubellm"):
        outcome = launch(rayjob, NS, api_client=fake_api.api_client(), timeout_s=10, poll_s=POLL)
    operator.finish()
    assert (outcome.kind, outcome.name, outcome.created, outcome.restarted) == ("RayJob", name, True, False)
    assert "Running (Ray job RUNNING)" in outcome.conditions
    assert outcome.conditions[-1] == "Complete (Ray job SUCCEEDED): Job finished successfully."
    assert f"RayJob {NS}/{name}: Running (Ray job RUNNING)" in caplog.text
    stored = fake_api.emulator.objects[next(iter(fake_api.emulator.objects))]
    assert stored["spec"] == rayjob["spec"] and _creates(fake_api) == 1


def test_rayjob_retried_step_reattaches(fake_api, rayjob: dict) -> None:
    from kubernetes import client

    api = fake_api.api_client()
    running = {**rayjob, "metadata": {**rayjob["metadata"], "namespace": NS}, "status": _ray("Running", "RUNNING")}
    client.CustomObjectsApi(api).create_namespaced_custom_object(*RJ, running)
    operator = Operator(api, RJ, rayjob["metadata"]["name"], [_ray("Complete", "SUCCEEDED")])
    operator.start()
    outcome = launch(rayjob, NS, api_client=api, timeout_s=10, poll_s=POLL)
    operator.finish()
    assert not outcome.created and _creates(fake_api) == 1


@pytest.mark.parametrize(
    ("final", "expected"),
    [
        (
            _ray(
                "Failed",
                "FAILED",
                "AppFailed",
                "Job entrypoint command failed with exit code 1, last available logs:\n"
                "TrainingError: loss is NaN at step 12",
            ),
            "failed: AppFailed: Ray job FAILED: Job entrypoint command failed with exit code 1, last available logs: "
            "TrainingError: loss is NaN at step 12",
        ),
        (
            _ray("Failed", "RUNNING", "DeadlineExceeded", "The RayJob has passed the activeDeadlineSeconds."),
            "failed: DeadlineExceeded: Ray job RUNNING: The RayJob has passed the activeDeadlineSeconds.",
        ),
        # KubeRay before 1.2 reports a failed Ray job as Complete: success needs SUCCEEDED too
        (
            _ray("Complete", "FAILED", message="Job failed due to an application error"),
            "failed: Ray job FAILED: Job failed due to an application error",
        ),
        (
            _ray("ValidationFailed", reason="ValidationFailed", message="invalid RayJob spec"),
            "failed: ValidationFailed: invalid RayJob spec",
        ),
    ],
)
def test_rayjob_failure_fails_the_step_with_rays_reason(fake_api, rayjob: dict, final: dict, expected: str) -> None:
    # a spec KubeRay rejects never runs; the others fail after running
    before = [] if final["jobDeploymentStatus"] == "ValidationFailed" else [_ray("Running", "RUNNING")]
    operator = Operator(fake_api.api_client(), RJ, rayjob["metadata"]["name"], [*before, final])
    operator.start()
    with pytest.raises(ClusterError) as info:
        launch(rayjob, NS, api_client=fake_api.api_client(), timeout_s=10, poll_s=POLL)
    operator.finish()
    assert str(info.value) == f"RayJob {NS}/{rayjob['metadata']['name']} {expected}"


def test_rayjob_that_failed_before_is_replaced(fake_api, rayjob: dict) -> None:
    from kubernetes import client

    api = fake_api.api_client()
    failed = {
        **rayjob,
        "metadata": {**rayjob["metadata"], "namespace": NS},
        "status": _ray("Failed", "FAILED", "AppFailed", "worker died"),
    }
    client.CustomObjectsApi(api).create_namespaced_custom_object(*RJ, failed)
    operator = Operator(
        api, RJ, rayjob["metadata"]["name"], [_ray("Complete", "SUCCEEDED")], when=lambda obj: not obj.get("status")
    )
    operator.start()
    outcome = launch(rayjob, NS, api_client=api, timeout_s=10, poll_s=POLL)
    operator.finish()
    assert outcome.created and outcome.restarted and _creates(fake_api) == 2


def test_rayjob_timeout_fails_clearly_and_leaves_the_job(fake_api, rayjob: dict) -> None:
    operator = Operator(fake_api.api_client(), RJ, rayjob["metadata"]["name"], [_ray("Running", "RUNNING")])
    operator.start()
    with pytest.raises(
        ClusterError,
        match=r"did not finish within 0.5s \(last: Running \(Ray job RUNNING\)\); "
        r"a retried step re-attaches to it, `kubectl delete rayjobs ",
    ):
        launch(rayjob, NS, api_client=fake_api.api_client(), timeout_s=0.5, poll_s=POLL)
    operator.finish()
    assert len(fake_api.emulator.objects) == 1


def test_run_training_job_launches_a_rayjob_for_engine_rayjob(
    fake_api, cluster_overrides: list[str], repo_root: Path
) -> None:
    """The call the training step makes: the same for every engine."""
    from kubellm.config import load_config

    cfg = load_config(
        repo_root / "configs" / "local.yaml",
        [*cluster_overrides, "platform.distributed.finetune.engine=rayjob", f"platform.namespace={NS}"],
    )
    env = {"KUBELLM_STAGE_RUN_ID": "abc123"}
    job = build_job(
        "rayjob",
        "finetune",
        cfg,
        "runs/r/data",
        "runs/r/out",
        "/mnt/kubellm/runs/r/base",
        data_fingerprint="fp2",
        env=env,
    )
    operator = Operator(fake_api.api_client(), RJ, job["metadata"]["name"], [_ray("Complete", "SUCCEEDED")])
    operator.start()
    outcome = run_training_job(
        "finetune",
        cfg,
        "runs/r/data",
        "runs/r/out",
        "/mnt/kubellm/runs/r/base",
        data_fingerprint="fp2",
        env=env,
        api_client=fake_api.api_client(),
        poll_s=POLL,
    )
    operator.finish()
    assert (outcome.kind, outcome.name, outcome.namespace) == ("RayJob", job["metadata"]["name"], NS)
    stored = fake_api.emulator.objects[next(iter(fake_api.emulator.objects))]
    head = stored["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "KUBELLM_STAGE_RUN_ID", "value": "abc123"} in head["env"]
