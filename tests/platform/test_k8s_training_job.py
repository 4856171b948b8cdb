"""Training-job manifests (PyTorchJob, TrainJob) against their CRDs, and the config they carry inline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kubellm.config import RunConfig, apply_overrides, load_config
from kubellm.config.run import validate_section
from kubellm.errors import ConfigError
from kubellm.k8s.jobspec import MAX_NAME, SHARED_MOUNT
from kubellm.k8s.schema import validate_against_crd
from kubellm.k8s.training_job import build_job

LOCAL = Path(__file__).resolve().parents[2] / "configs" / "local.yaml"
CRDS = {"pytorchjob": "training-operator-pytorchjobs.crd.yaml", "trainjob": "trainer-trainjobs.crd.yaml"}
KINDS_STAGES = [(k, s) for k in CRDS for s in ("pretrain", "finetune")]


def _job(cfg: RunConfig, kind: str = "pytorchjob", stage: str = "pretrain", **kw):
    base = "/mnt/kubellm/runs/r1/pretrained" if stage == "finetune" else None
    return build_job(kind, stage, cfg, "prepared/abc", "runs/r1/" + stage, base, **kw)


def _pod_template(job: dict) -> dict:
    if job["kind"] == "PyTorchJob":
        return next(iter(job["spec"]["pytorchReplicaSpecs"].values()))["template"]
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]
    return patch["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]


def _args(job: dict) -> list[str]:
    if job["kind"] == "PyTorchJob":
        return job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    return job["spec"]["trainer"]["args"]


@pytest.mark.parametrize(("kind", "stage"), KINDS_STAGES)
def test_manifest_validates_against_crd(cluster_cfg: RunConfig, kind: str, stage: str) -> None:
    job = _job(cluster_cfg, kind, stage, data_fingerprint="f" * 16, env={"MLFLOW_RUN_ID": "abc"})
    assert validate_against_crd(job) == []


def test_elastic_pytorchjob(cluster_overrides: list[str]) -> None:
    cfg = load_config(
        LOCAL,
        [*cluster_overrides, "platform.distributed.pretrain.min_nodes=1", "platform.distributed.pretrain.max_nodes=4"],
    )
    job = _job(cfg)
    assert validate_against_crd(job) == []
    spec = job["spec"]
    assert spec["elasticPolicy"] == {"minReplicas": 1, "maxReplicas": 4, "maxRestarts": 3, "rdzvBackend": "c10d"}
    assert list(spec["pytorchReplicaSpecs"]) == ["Worker"]
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    command = spec["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert "--nnodes=1:4" in command and "--max-restarts=3" in command


def test_pytorchjob_carries_placement_and_policies(cluster_cfg: RunConfig) -> None:
    job = _job(cluster_cfg)
    spec = job["spec"]
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1  # 2 nodes: a master and a worker
    assert spec["nprocPerNode"] == "4"
    assert spec["runPolicy"]["backoffLimit"] == 3
    assert spec["runPolicy"]["activeDeadlineSeconds"] == 24 * 3600
    assert spec["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] == "OnFailure"
    pod = _pod_template(job)["spec"]
    (c,) = pod["containers"]
    assert c["name"] == "pytorch" and c["image"] == cluster_cfg.platform.image
    assert c["command"] == ["torchrun", "--nnodes=2", "--nproc-per-node=4", "--no-python", "kubellm", "pretrain"]
    assert c["args"][:4] == ["--data", f"{SHARED_MOUNT}/prepared/abc", "--out", f"{SHARED_MOUNT}/runs/r1/pretrain"]
    assert c["resources"] == {"requests": {"cpu": "8"}, "limits": {"memory": "64Gi", "nvidia.com/gpu": 4}}
    assert pod["nodeSelector"] == {"pool": "gpu", "cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["automountServiceAccountToken"] is False
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"kubellm-shared", "hf-models"}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {SHARED_MOUNT, "/models", "/var/run/secrets/hub", "/tmp"} <= mounts
    secret_env = [e for e in c["env"] if "valueFrom" in e]
    assert secret_env == [
        {"name": "MLFLOW_TRACKING_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "mlflow-auth", "key": "password"}}}
    ]


def test_trainjob_references_runtime_and_patches_pods(cluster_cfg: RunConfig) -> None:
    job = _job(cluster_cfg, "trainjob", "finetune")
    spec = job["spec"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    assert spec["trainer"]["numNodes"] == 1 and spec["trainer"]["numProcPerNode"] == 1
    assert spec["trainer"]["command"][-2:] == ["kubellm", "finetune"]
    assert spec["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 4
    assert "--base" in spec["trainer"]["args"]
    pod = _pod_template(job)["spec"]
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize(("kind", "stage"), KINDS_STAGES)
def test_inline_config_round_trips(cluster_cfg: RunConfig, kind: str, stage: str) -> None:
    """What the pods parse from ``--set`` is the stage's config, without the platform section (so no
    pod launches a job of its own)."""
    args = _args(_job(cluster_cfg, kind, stage))
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    rebuilt = validate_section(RunConfig, apply_overrides({}, sets), "--set")
    assert getattr(rebuilt, stage) == getattr(cluster_cfg, stage)
    assert rebuilt.platform.distributed_for(stage).engine == "none"
    assert rebuilt.tracking == cluster_cfg.tracking and rebuilt.name == cluster_cfg.name
    assert getattr(rebuilt, "pretrain" if stage == "finetune" else "finetune") is None


def test_float_values_survive_yaml(cluster_overrides: list[str]) -> None:
    cfg = load_config(LOCAL, [*cluster_overrides, "pretrain.optim.lr=3.0e-05"])
    sets = [a for a in _args(_job(cfg)) if a.startswith("pretrain.optim.lr=")]
    assert sets == ["pretrain.optim.lr=3.0e-05"]
    assert apply_overrides({}, sets)["pretrain"]["optim"]["lr"] == 3e-05


def test_name_is_stable_and_follows_config_and_data(cluster_overrides: list[str], cluster_cfg: RunConfig) -> None:
    a = _job(cluster_cfg, data_fingerprint="d1")["metadata"]["name"]
    assert a == _job(cluster_cfg, data_fingerprint="d1", env={"MLFLOW_RUN_ID": "x"})["metadata"]["name"]
    assert a != _job(cluster_cfg, data_fingerprint="d2")["metadata"]["name"]
    changed = load_config(LOCAL, [*cluster_overrides, "pretrain.loop.max_steps=61"])
    assert a != _job(changed, data_fingerprint="d1")["metadata"]["name"]
    assert re.fullmatch(r"pretrain-local-[0-9a-f]{10}", a)


@pytest.mark.parametrize("run_name", ["2024-llm", "a" * 63, "x"])
def test_name_is_a_short_rfc1035_label(cluster_overrides: list[str], run_name: str) -> None:
    cfg = load_config(LOCAL, [*cluster_overrides, f"name={run_name}"])
    name = _job(cfg)["metadata"]["name"]
    assert len(name) <= MAX_NAME
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)


@pytest.mark.parametrize(
    ("data_dir", "needle"),
    [
        ("/data/prepared", "only see the shared PVC"),
        ("../escape", "'..' is not allowed"),
        ("/mnt/kubellm/../etc", "'..' is not allowed"),
    ],
)
def test_paths_must_be_on_the_shared_pvc(cluster_cfg: RunConfig, data_dir: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        build_job("pytorchjob", "pretrain", cluster_cfg, data_dir, "out")


def test_hub_base_model_passes_through(cluster_cfg: RunConfig) -> None:
    job = build_job("trainjob", "finetune", cluster_cfg, "d", "o", "org/model")
    args = job["spec"]["trainer"]["args"]
    assert args[args.index("--base") + 1] == "org/model"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["tracking.uri=https://admin:hunter2@mlflow.example.com"], "credentials in the URI"),
        (
            ["platform.distributed.pretrain.engine=none", "platform.distributed.pretrain.shared_pvc=null"],
            "needs a shared PVC",
        ),
    ],
)
def test_unusable_configs_fail_before_building(cluster_overrides: list[str], overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:  # credentials: already when the config loads
        _job(load_config(LOCAL, [*cluster_overrides, *overrides]))
    assert "hunter2" not in str(info.value)


def test_missing_stage_and_unknown_kind(cluster_cfg: RunConfig) -> None:
    cfg = cluster_cfg.model_copy(update={"finetune": None})
    with pytest.raises(ConfigError, match="no 'finetune' section"):
        build_job("pytorchjob", "finetune", cfg, "d", "o")
    with pytest.raises(ConfigError, match="training job kind 'mpijob'"):
        build_job("mpijob", "pretrain", cluster_cfg, "d", "o")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["platform.distributed.pretrain.min_nodes=3"], "nodes (2) must lie within min_nodes..max_nodes (3..2)"),
        (["platform.distributed.finetune.max_nodes=3"], "needs engine 'pytorchjob'"),
    ],
)
def test_elastic_config_is_checked_up_front(cluster_overrides: list[str], overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(LOCAL, [*cluster_overrides, *overrides])


def test_gpu_config_jobs_validate_and_mount_the_shared_pvc_once(repo_root: Path) -> None:
    cfg = load_config(repo_root / "configs" / "cluster-gpu.yaml")
    for stage in ("pretrain", "finetune"):
        engine = cfg.platform.distributed_for(stage).engine
        job = build_job(engine, stage, cfg, "prepared/x", "runs/x")
        assert validate_against_crd(job) == []
        pod = _pod_template(job)["spec"]
        mounts = [m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]]
        assert mounts.count(SHARED_MOUNT) == 1, mounts  # the stage's own PVC entry is folded into it


def test_another_volume_at_the_shared_mount_is_refused(cluster_overrides: list[str]) -> None:
    cfg = load_config(LOCAL, [*cluster_overrides, "platform.default.pvcs=[{claim: other, mount_path: /mnt/kubellm}]"])
    with pytest.raises(ConfigError, match="PVC 'other' is mounted at /mnt/kubellm"):
        _job(cfg)


def test_cli_dry_run_prints_the_job_with_the_data_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], cluster_overrides: list[str]
) -> None:
    import json

    import yaml

    from kubellm.cli.app import main
    from kubellm.k8s import jobspec

    # The step's pod sees the shared PVC at SHARED_MOUNT; here a temporary folder plays that mount.
    monkeypatch.setattr(jobspec, "SHARED_MOUNT", str(tmp_path))
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
    sets = [a for o in cluster_overrides for a in ("--set", o)]
    with pytest.raises(SystemExit) as info:
        main(
            [
                "train-job",
                "--config",
                str(LOCAL),
                *sets,
                "--stage",
                "pretrain",
                "--data",
                "prepared",
                "--out",
                "runs/1",
                "--dry-run",
            ]
        )
    assert info.value.code == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["metadata"]["annotations"]["kubellm.io/data-fingerprint"] == "feedbeef"
    assert validate_against_crd(job) == []
    with pytest.raises(SystemExit) as info:
        main(["train-job", "--config", str(LOCAL), "--stage", "pretrain", "--data", "d", "--out", "o"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: platform.distributed.pretrain.engine is 'none': set it (or pass --kind) to run a job"
    )
