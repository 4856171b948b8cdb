"""A training step with `distributed.engine` set hands the work to a training-operator job through the
shared PVC, and brings the job's model back as its own output."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubellm import stages
from kubellm.config import load_config
from kubellm.config.params import to_param

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubellm.data.prepare import prepare

    cfg = load_config(REPO / "configs" / "local.yaml", ["data.max_docs=20", "data.block_size=32",
                                                         "data.tokenizer.vocab_size=400"])
    out = tmp_path_factory.mktemp("prep") / "data"
    prepare(cfg.data, out)
    return out


def test_pretrain_step_runs_as_a_job_on_the_shared_pvc(prepared: Path, tmp_path: Path, monkeypatch) -> None:
    import kubellm.k8s.training_job as tj
    from kubellm.train.pretrain import pretrain

    pvc = tmp_path / "pvc"
    monkeypatch.setattr(tj, "SHARED_MOUNT", str(pvc))
    cfg = load_config(REPO / "configs" / "local.yaml", [
        "pretrain.distributed.engine=pytorchjob", "pretrain.distributed.shared_pvc=kubellm-shared",
        "pretrain.loop.max_steps=3", "pretrain.loop.micro_batch_size=2", "pretrain.loop.checkpoint_every=2",
        "tracking.enabled=false"])
    launched = []

    def operator(stage, run_cfg, data_dir, out_dir, base_model=None, **kw):
        """Stands in for the training operator: the job's pods see only the PVC."""
        assert Path(data_dir).is_relative_to(pvc) and Path(out_dir).is_relative_to(pvc)
        assert kw["data_fingerprint"]
        launched.append((stage, data_dir, out_dir))
        pretrain(run_cfg.pretrain, data_dir, out_dir)
        return tj.JobOutcome(kind="PyTorchJob", name="pretrain-x", namespace="kubellm", created=True,
                             restarted=False, elapsed_s=1.0, conditions=["Succeeded"])

    monkeypatch.setattr(tj, "run_training_job", operator)
    trk = stages.Tracking.from_param(to_param(cfg.tracking), str(tmp_path))
    out = tmp_path / "artifact"
    result = stages.pretrain(to_param(cfg.pretrain), str(prepared), str(out), trk, run_config=to_param(cfg))
    assert [s for s, _, _ in launched] == ["pretrain"]
    assert (out / "config.json").is_file() and (out / "kubellm_train.json").is_file()
    assert not (out / "checkpoints").exists()  # they stay on the PVC for restarts
    assert result.metrics["steps"] == 3.0
    # a retried step re-uses the data already on the PVC
    data_on_pvc = Path(launched[0][1])
    assert (data_on_pvc / "manifest.json").is_file()


def test_engine_without_run_config_is_a_clear_error(prepared: Path, tmp_path: Path) -> None:
    from kubellm.errors import ConfigError

    cfg = load_config(REPO / "configs" / "local.yaml", [
        "pretrain.distributed.engine=trainjob", "pretrain.distributed.shared_pvc=kubellm-shared",
        "tracking.enabled=false"])
    trk = stages.Tracking.from_param(to_param(cfg.tracking), str(tmp_path))
    with pytest.raises(ConfigError, match="needs the run config"):
        stages.pretrain(to_param(cfg.pretrain), str(prepared), str(tmp_path / "o"), trk)


def test_compiled_step_mounts_the_shared_pvc(tmp_path: Path) -> None:
    from kubellm.pipelines._runner import compile_all

    cfg = load_config(REPO / "configs" / "local.yaml", [
        "finetune.distributed.engine=pytorchjob", "finetune.distributed.shared_pvc=kubellm-shared",
        "tracking.uri=http://mlflow:5000"])
    (path,) = compile_all(cfg, tmp_path, ["llm-lifecycle"], components=False)
    execs = list(yaml.safe_load_all(path.read_text()))[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert execs["exec-finetune"]["pvcMount"][0]["mountPath"] == "/mnt/kubellm"
    assert "pvcMount" not in execs.get("exec-pretrain", {})
