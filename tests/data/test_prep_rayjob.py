"""The prep RayJob (``data.engine: ray`` with ``data.cluster.nodes``): the example cluster config's job
validates against the vendored KubeRay CRD and Pod Security, runs on CPU workers with the prep placement
and Kueue's labels, and its entrypoint prepares exactly the configured data in place on its Ray cluster."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubellm.config import load_config
from kubellm.config.platform import QUEUE_LABEL
from kubellm.errors import ConfigError
from kubellm.k8s.manifests import generated_manifests
from kubellm.k8s.podsecurity import check, pod_specs
from kubellm.k8s.rayjob import build_prep_rayjob
from kubellm.k8s.schema import validate_against_crd

REPO = Path(__file__).resolve().parents[2]
CLUSTER_RAY = REPO / "configs" / "cluster-ray.yaml"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cfg():
    return load_config(CLUSTER_RAY, ["platform.queue_name=team-a"])


def test_the_example_prep_rayjob_validates_and_runs_on_cpu_workers(cfg) -> None:
    job = build_prep_rayjob(cfg, "data", "prepared/corpus", data_fingerprint="f" * 32)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert validate_against_crd(job) == [] and check(job) == []
    assert len(pod_specs(job)) == 2  # head (the driver) and the workers, both restricted
    assert job["metadata"]["labels"][QUEUE_LABEL] == "team-a"  # Kueue admits the job as a whole
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "prep"
    cluster = job["spec"]["rayClusterSpec"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["replicas"] == cfg.data.cluster.nodes == 8
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no Ray Data task on the driver's pod
    (w,) = workers["template"]["spec"]["containers"]
    assert w["resources"] == {"requests": {"cpu": "16", "memory": "32Gi"}, "limits": {"memory": "64Gi"}}
    assert {"name": "shared", "mountPath": "/mnt/kubellm"} in w["volumeMounts"]
    assert job["spec"]["activeDeadlineSeconds"] == cfg.data.cluster.timeout_seconds
    # The name follows the data: a retried step re-attaches, new data gets a new job.
    again = build_prep_rayjob(cfg, "data", "prepared/corpus", data_fingerprint="f" * 32)
    other = build_prep_rayjob(cfg, "data", "prepared/corpus", data_fingerprint="e" * 32)
    assert again["metadata"]["name"] == job["metadata"]["name"] != other["metadata"]["name"]
    assert ("generated rayjob (prep)", build_prep_rayjob(cfg, "data", "prepared/example")) in generated_manifests(cfg)


def test_the_entrypoint_prepares_the_configured_data_in_place(cfg) -> None:
    argv = shlex.split(build_prep_rayjob(cfg, "data", "prepared/corpus", "prepared/tok")["spec"]["entrypoint"])
    assert argv[:8] == [
        "kubellm",
        "prep",
        "--out",
        "/mnt/kubellm/prepared/corpus",
        "--section",
        "data",
        "--tokenizer",
        "/mnt/kubellm/prepared/tok",
    ]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    inner = load_config(None, sets)
    assert inner.data.cluster.nodes == 0  # inside the job: prepare here, on the job's Ray cluster
    assert inner.data.model_dump(exclude={"cluster"}) == cfg.data.model_dump(exclude={"cluster"})
    assert (
        inner.data.engine == "ray"
        and inner.tracking == cfg.tracking
        and inner.platform.distributed.pretrain.engine == "none"
    )


def test_bad_prep_cluster_configs_fail_before_anything_is_built(cfg) -> None:
    with pytest.raises(ConfigError, match="out_dir"):
        build_prep_rayjob(cfg, "data", "/elsewhere/out")
    local = load_config(CLUSTER_RAY, ["data.cluster.nodes=0"])
    with pytest.raises(ConfigError, match="cluster.nodes"):
        build_prep_rayjob(local, "data", "prepared/corpus")
    with pytest.raises(ConfigError, match="engine: ray"):
        load_config(CLUSTER_RAY, ["data.engine=local"])
    with pytest.raises(ConfigError, match="shared_pvc"):
        load_config(CLUSTER_RAY, ["data.cluster.shared_pvc=null"])


def test_cli_dry_run_prints_the_prep_rayjob(cfg, tmp_path: Path) -> None:
    run = subprocess.run(
        [
            str(BIN / "kubellm"),
            "prep",
            "--config",
            str(CLUSTER_RAY),
            "--set",
            "platform.queue_name=team-a",
            "--out",
            "prepared/corpus",
            "--dry-run",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert yaml.safe_load(run.stdout) == build_prep_rayjob(cfg, "data", "prepared/corpus")
    assert list(tmp_path.iterdir()) == []  # nothing prepared or written here
