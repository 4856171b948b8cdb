"""RayJob manifests (KubeRay ray.io/v1): CRD, placement, Pod Security, entrypoint and the inline config."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import pytest
import yaml

from kubellm.config import RunConfig, apply_overrides, load_config
from kubellm.config.run import validate_section
from kubellm.errors import ConfigError
from kubellm.k8s.jobspec import SHARED_MOUNT
from kubellm.k8s.podsecurity import check, pod_specs
from kubellm.k8s.rayjob import ENTRY_MODULE
from kubellm.k8s.schema import validate_against_crd
from kubellm.k8s.training_job import build_job

LOCAL = Path(__file__).resolve().parents[2] / "configs" / "local.yaml"
RAY = [
    "platform.distributed.pretrain.engine=rayjob",
    "platform.distributed.finetune.engine=rayjob",
    "platform.distributed.pretrain.procs_per_node=4",
    "platform.distributed.pretrain.ttl_seconds_after_finished=60",
    "platform.distributed.pretrain.timeout_seconds=7200",
]


@pytest.fixture(scope="module")
def ray_cfg(cluster_overrides: list[str]) -> RunConfig:
    return load_config(LOCAL, [*cluster_overrides, *RAY])


def _job(cfg: RunConfig, stage: str = "pretrain", **kw) -> dict:
    base = "/mnt/kubellm/runs/r1/pretrained" if stage == "finetune" else None
    return build_job("rayjob", stage, cfg, "prepared/abc", "runs/r1/" + stage, base, **kw)


def _groups(job: dict) -> tuple[dict, dict]:
    cluster = job["spec"]["rayClusterSpec"]
    (workers,) = cluster["workerGroupSpecs"]
    return cluster["headGroupSpec"], workers


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_rayjob_validates_against_the_kuberay_crd_and_pod_security(ray_cfg: RunConfig, stage: str) -> None:
    job = _job(ray_cfg, stage, data_fingerprint="f" * 16, env={"KUBELLM_STAGE_RUN_ID": "abc"})
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert validate_against_crd(job) == []
    assert check(job) == []
    assert len(pod_specs(job)) == 2  # head and workers, both checked


def test_cluster_has_a_head_and_gpu_workers_with_the_stage_placement(ray_cfg: RunConfig) -> None:
    job = _job(ray_cfg, env={"KUBELLM_STAGE_RUN_ID": "abc"})
    head, workers = _groups(job)
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 2
    # the head runs no training worker: no CPUs offered to Ray, no GPU requested
    assert head["rayStartParams"]["num-cpus"] == "0"
    (h,) = head["template"]["spec"]["containers"]
    (w,) = workers["template"]["spec"]["containers"]
    assert w["resources"] == {"requests": {"cpu": "8"}, "limits": {"memory": "64Gi", "nvidia.com/gpu": 4}}
    assert h["resources"] == {"requests": {"cpu": "8"}, "limits": {"memory": "64Gi"}}
    wpod, hpod = workers["template"]["spec"], head["template"]["spec"]
    assert wpod["nodeSelector"] == {"pool": "gpu", "cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert hpod["nodeSelector"] == {"pool": "gpu"}
    for pod, c in ((hpod, h), (wpod, w)):
        assert c["image"] == ray_cfg.platform.image and "command" not in c  # KubeRay writes `ray start`
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert sorted(claims) == ["hf-models", "kubellm-shared"]
        mounts = [m["mountPath"] for m in c["volumeMounts"]]
        assert mounts.count(SHARED_MOUNT) == 1 and {"/models", "/var/run/secrets/hub", "/tmp", "/dev/shm"} <= set(
            mounts
        )
        env = {e["name"]: e for e in c["env"]}
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "mlflow-auth",
            "key": "password",
        }
        assert env["KUBELLM_STAGE_RUN_ID"]["value"] == "abc" and env["RAY_USAGE_STATS_ENABLED"]["value"] == "0"


def test_lifecycle_cleans_up_and_is_bounded(ray_cfg: RunConfig) -> None:
    spec = _job(ray_cfg)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 60
    assert spec["activeDeadlineSeconds"] == 7200
    assert spec["submissionMode"] == "HTTPMode"  # no operator-built submitter pod
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_entrypoint_runs_ray_train_with_the_inline_config(ray_cfg: RunConfig, stage: str) -> None:
    argv = shlex.split(_job(ray_cfg, stage)["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", ENTRY_MODULE, stage]
    opts = dict(zip(argv[4:], argv[5:], strict=False))
    workers = 8 if stage == "pretrain" else 1  # 2 nodes × 4 GPUs; finetune: 1 node × 1 process
    assert (opts["--workers"], opts["--gpus-per-worker"], opts["--max-failures"]) == (str(workers), "1", "3")
    assert opts["--data"] == f"{SHARED_MOUNT}/prepared/abc" and opts["--out"] == f"{SHARED_MOUNT}/runs/r1/{stage}"
    assert (opts.get("--base") == "/mnt/kubellm/runs/r1/pretrained") == (stage == "finetune")
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    rebuilt = validate_section(RunConfig, apply_overrides({}, sets), "--set")
    assert getattr(rebuilt, stage) == getattr(ray_cfg, stage) and rebuilt.tracking == ray_cfg.tracking
    assert rebuilt.platform.distributed_for(stage).engine == "none"  # no job launches a job


def test_name_is_deterministic_and_follows_config_and_data(ray_cfg: RunConfig, cluster_overrides: list[str]) -> None:
    name = _job(ray_cfg, data_fingerprint="aa")["metadata"]["name"]
    assert _job(ray_cfg, data_fingerprint="aa", env={"KUBELLM_STAGE_RUN_ID": "x"})["metadata"]["name"] == name
    assert _job(ray_cfg, data_fingerprint="bb")["metadata"]["name"] != name
    other = load_config(LOCAL, [*cluster_overrides, *RAY, "pretrain.optim.lr=0.001"])
    assert _job(other, data_fingerprint="aa")["metadata"]["name"] != name
    assert name.startswith("pretrain-local-") and len(name) <= 40


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["platform.distributed.pretrain.procs_per_node=8"], "procs_per_node (8) exceeds the 4 GPU(s) per pod"),
        (["platform.distributed.pretrain.shared_pvc=null"], "needs shared_pvc"),
        (["platform.distributed.pretrain.min_nodes=1"], "needs engine 'pytorchjob'"),
    ],
)
def test_unusable_config_is_one_clear_error(cluster_overrides: list[str], overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        _job(load_config(LOCAL, [*cluster_overrides, *RAY, *overrides]))


def test_k8sjobmode_submitter_is_flagged_by_the_checker(ray_cfg: RunConfig) -> None:
    job = _job(ray_cfg)
    job["spec"]["submissionMode"] = "K8sJobMode"
    assert [f.rule for f in check(job)] == ["submitter-pod-unchecked"]
    job["spec"]["submitterPodTemplate"] = copy.deepcopy(job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])
    assert check(job) == [] and len(pod_specs(job)) == 3
    job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["securityContext"]["runAsUser"] = 0
    assert [f.path for f in check(job)] == ["spec.submitterPodTemplate.spec.containers[0].securityContext.runAsUser"]
    job["spec"]["submissionMode"] = "SidecarMode"
    assert "submitter-pod-unchecked" in [f.rule for f in check(job)]


def test_cli_dry_run_prints_a_valid_rayjob(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], cluster_overrides: list[str]
) -> None:
    from kubellm.cli.app import main
    from kubellm.k8s import jobspec

    monkeypatch.setattr(jobspec, "SHARED_MOUNT", str(tmp_path))  # this folder plays the PVC's mount
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "manifest.json").write_text(
        json.dumps(
            {
                "kind": "pretrain",
                "block_size": 128,
                "vocab_size": 2048,
                "eos_token_id": 0,
                "pad_token_id": 0,
                "bos_token_id": None,
                "fingerprint": "feedbeef",
                "splits": {"train": 1},
                "format_version": 1,
            }
        )
    )
    sets = [a for o in cluster_overrides for a in ("--set", o)]  # pretrain's engine is pytorchjob there
    with pytest.raises(SystemExit) as info:
        main(
            [
                "train-job",
                "--config",
                str(LOCAL),
                *sets,
                "--stage",
                "pretrain",
                "--kind",
                "rayjob",
                "--data",
                "prepared",
                "--out",
                "runs/1",
                "--dry-run",
            ]
        )
    assert info.value.code == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["kind"] == "RayJob" and job["metadata"]["annotations"]["kubellm.io/data-fingerprint"] == "feedbeef"
    assert validate_against_crd(job) == [] and check(job) == []


def test_cli_check_validates_a_rayjob_against_its_crd(
    ray_cfg: RunConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubellm.cli.app import main

    job = _job(ray_cfg)
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    job["spec"]["shutdownAfterJobFinish"] = True  # a typo the API server would silently prune
    (tmp_path / "rayjob.yaml").write_text(yaml.safe_dump(job))
    with pytest.raises(SystemExit) as info:
        main(["check", str(tmp_path / "rayjob.yaml")])
    out = capsys.readouterr().out
    assert info.value.code == 1
    where = f"{tmp_path / 'rayjob.yaml'}#0 RayJob/{job['metadata']['name']}"
    assert f"{where}: spec: Additional properties are not allowed ('shutdownAfterJobFinish' was unexpected)" in out
    assert f"{where}: spec.rayClusterSpec.workerGroupSpecs[0].replicas: 'two' is not of type 'integer'" in out
    assert "checked 1 manifests, 2 pod specs, 0 pipeline executors: 2 findings" in out


def test_the_entrypoint_is_what_the_ray_train_runner_parses(
    ray_cfg: RunConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Builder and runner agree on the command line; bad input is one line and exit code 2, before Ray."""
    from kubellm.stages import ray_train

    monkeypatch.setattr("kubellm.log.setup", lambda *a, **k: None)  # its handler would outlive capsys
    argv = shlex.split(_job(ray_cfg)["spec"]["entrypoint"])[3:]
    args = ray_train._parser().parse_args(argv)
    assert (args.stage, args.workers, args.gpus_per_worker, args.max_failures) == ("pretrain", 8, 1, 3)
    argv[argv.index("--workers") + 1] = "0"
    assert ray_train.main(argv) == 2
    assert capsys.readouterr().err.strip() == "error: workers (0) must be ≥ 1 and gpus_per_worker (1) 0 or 1"
    assert ray_train.main([*argv, "--set", "pretrain.loop.max_steps=0"]) == 2
    assert "pretrain.loop.max_steps" in capsys.readouterr().err


def test_only_the_ray_engines_import_ray(repo_root: Path) -> None:
    importers = sorted(
        str(p.relative_to(repo_root))
        for p in (repo_root / "src").rglob("*.py")
        if any(line.lstrip().startswith(("import ray", "from ray")) for line in p.read_text().splitlines())
    )
    assert importers == ["src/kubellm/data/ray_engine.py", "src/kubellm/stages/ray_train.py"]
