"""A training step with `distributed.engine` set hands the work to a training-operator job through the
shared PVC, and brings the job's model back as its own output."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubellm import yamlio
from kubellm.config import load_config
from kubellm.config.params import to_param
from kubellm.stages import STAGE_RUN_ENV, StageContext, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubellm.data.prepare import prepare

    cfg = load_config(
        REPO / "configs" / "local.yaml", ["data.max_docs=20", "data.block_size=32", "data.tokenizer.vocab_size=400"]
    )
    out = tmp_path_factory.mktemp("prep") / "data"
    prepare(cfg.data, out)
    return out


def test_pretrain_step_runs_as_a_job_on_the_shared_pvc(prepared: Path, tmp_path: Path, monkeypatch) -> None:
    import kubellm.k8s.jobspec as jobspec
    import kubellm.k8s.training_job as tj
    from kubellm.train.pretrain import pretrain

    pvc = tmp_path / "pvc"
    monkeypatch.setattr(jobspec, "SHARED_MOUNT", str(pvc))
    cfg = load_config(
        REPO / "configs" / "local.yaml",
        [
            "platform.distributed.pretrain.engine=pytorchjob",
            "platform.distributed.pretrain.shared_pvc=kubellm-shared",
            "pretrain.loop.max_steps=3",
            "pretrain.loop.micro_batch_size=2",
            "pretrain.loop.checkpoint_every=2",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        ],
    )
    launched = []

    def operator(stage, run_cfg, data_dir, out_dir, base_model=None, **kw):
        """Stands in for the training operator: the job's pods see only the PVC."""
        assert Path(data_dir).is_relative_to(pvc) and Path(out_dir).is_relative_to(pvc)
        assert kw["data_fingerprint"]
        launched.append((stage, data_dir, out_dir, kw["env"]))
        pretrain(run_cfg.pretrain, data_dir, out_dir)
        return tj.JobOutcome(
            kind="PyTorchJob",
            name="pretrain-x",
            namespace="kubellm",
            created=True,
            restarted=False,
            elapsed_s=1.0,
            conditions=["Succeeded"],
        )

    monkeypatch.setattr(tj, "run_training_job", operator)
    ctx = StageContext.from_param(to_param(cfg.tracking), str(tmp_path))
    out = tmp_path / "artifact"
    result = train.pretrain(to_param(cfg.pretrain), str(prepared), str(out), ctx, platform=to_param(cfg.platform))
    assert [s for s, _, _, _ in launched] == ["pretrain"]
    # the job's rank 0 logs into this step's own MLflow run (not the parent's)
    job_run = launched[0][3][STAGE_RUN_ENV]
    from kubellm.tracking.connect import mlflow_client

    run = mlflow_client(cfg.tracking, str(tmp_path))[0].get_run(job_run)
    assert run.data.tags["stage"] == "pretrain" and run.info.status == "FINISHED"
    assert (out / "config.json").is_file() and (out / "kubellm_train.json").is_file()
    assert not (out / "checkpoints").exists()  # they stay on the PVC for restarts
    assert result.metrics["steps"] == 3.0
    # a retried step re-uses the data already on the PVC
    data_on_pvc = Path(launched[0][1])
    assert (data_on_pvc / "manifest.json").is_file()


def test_under_kfps_mlflow_plugin_the_jobs_pods_log_into_the_handed_run_on_its_server(
    prepared: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    """The step was handed MLFLOW_RUN_ID (KFP's MLflow plugin): the job's pods are given that run, the
    server and workspace it lives in (not the config's tracking.uri), and no kubernetes auth mode, which
    needs a service-account token the pods do not mount (one warning line says what to give them)."""
    from mlflow import MlflowClient

    import kubellm.k8s.jobspec as jobspec
    import kubellm.k8s.training_job as tj
    from kubellm.tracking.connect import prepare_sqlite_store
    from kubellm.train.pretrain import pretrain

    plugin_uri = f"sqlite:///{tmp_path}/plugin.db"
    prepare_sqlite_store(plugin_uri)
    client = MlflowClient(plugin_uri)
    exp = client.create_experiment("kfp", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="kfp-run").info.run_id
    handed = client.create_run(exp, run_name="pretrain", tags={"mlflow.parentRunId": parent}).info.run_id
    for name, value in {
        "MLFLOW_TRACKING_URI": plugin_uri,
        "MLFLOW_RUN_ID": handed,
        "MLFLOW_WORKSPACE": "team-a",
        "MLFLOW_TRACKING_AUTH": "kubernetes",
    }.items():  # (a sqlite store needs no request auth)
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(jobspec, "SHARED_MOUNT", str(tmp_path / "pvc"))
    cfg = load_config(
        REPO / "configs" / "local.yaml",
        [
            "platform.distributed.pretrain.engine=pytorchjob",
            "platform.distributed.pretrain.shared_pvc=kubellm-shared",
            "pretrain.loop.max_steps=2",
            "pretrain.loop.micro_batch_size=2",
            f"tracking.uri=sqlite:///{tmp_path}/elsewhere.db",
        ],
    )
    launched = []

    def operator(stage, run_cfg, data_dir, out_dir, base_model=None, **kw):
        launched.append((run_cfg.tracking.uri, kw["env"]))
        pretrain(run_cfg.pretrain, data_dir, out_dir)
        return tj.JobOutcome(
            kind="PyTorchJob",
            name="pretrain-x",
            namespace="kubellm",
            created=True,
            restarted=False,
            elapsed_s=1.0,
            conditions=["Succeeded"],
        )

    monkeypatch.setattr(tj, "run_training_job", operator)
    ctx = StageContext.from_param(to_param(cfg.tracking), str(tmp_path))
    with caplog.at_level("WARNING"):
        train.pretrain(to_param(cfg.pretrain), str(prepared), str(tmp_path / "o"), ctx, platform=to_param(cfg.platform))
    ((uri, env),) = launched
    assert uri is None  # the pods resolve the forwarded $MLFLOW_TRACKING_URI, not the config's
    assert env == {"MLFLOW_TRACKING_URI": plugin_uri, "MLFLOW_WORKSPACE": "team-a", STAGE_RUN_ENV: handed}
    assert "MLFLOW_TRACKING_AUTH=kubernetes is not passed to its pods" in caplog.text
    run = client.get_run(handed)
    assert run.data.tags["stage"] == "pretrain" and run.info.status == "FINISHED"
    assert run.data.tags["pretrain.job"] == "PyTorchJob/pretrain-x"
    assert sorted(r.info.run_id for r in client.search_runs([exp])) == sorted([parent, handed])  # none opened
    assert not (tmp_path / "elsewhere.db").exists()


def test_the_engine_is_a_compile_time_platform_setting(prepared: Path, tmp_path: Path, monkeypatch) -> None:
    """The stage section no longer carries ``distributed``: a pretrain config that names it is refused,
    and without the platform section the step trains in its own pod."""
    import kubellm.k8s.training_job as tj
    from kubellm.errors import ConfigError

    with pytest.raises(ConfigError, match="distributed: unknown field"):
        load_config(REPO / "configs" / "local.yaml", ["pretrain.distributed.engine=trainjob"])
    monkeypatch.setattr(tj, "run_training_job", lambda *a, **kw: pytest.fail("no job without the platform"))
    cfg = load_config(REPO / "configs" / "local.yaml", ["pretrain.loop.max_steps=1", "tracking.enabled=false"])
    ctx = StageContext.from_param(to_param(cfg.tracking), str(tmp_path))
    assert train.pretrain(to_param(cfg.pretrain), str(prepared), str(tmp_path / "o"), ctx).metrics["steps"] == 1.0


def test_compiled_step_mounts_the_shared_pvc(tmp_path: Path) -> None:
    from kubellm.pipelines._runner import compile_all

    cfg = load_config(
        REPO / "configs" / "local.yaml",
        [
            "platform.distributed.finetune.engine=pytorchjob",
            "platform.distributed.finetune.shared_pvc=kubellm-shared",
            "tracking.uri=http://mlflow:5000",
        ],
    )
    (path,) = compile_all(cfg, tmp_path, ["llm-lifecycle"], components=False)
    execs = yamlio.load_all(path.read_text())[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert execs["exec-finetune"]["pvcMount"][0]["mountPath"] == "/mnt/kubellm"
    assert "pvcMount" not in execs.get("exec-pretrain", {})
