"""Kubernetes side of a run: images, pod placement and multi-node training.

These fields are compile-time: ``pipelines/`` applies them with kfp-kubernetes when compiling, and the
training launcher uses ``DistributedConfig`` to create PyTorchJobs/TrainJobs/RayJobs. A local run ignores them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from kubellm.config.base import StrictModel

#: A Kubernetes quantity ("2", "500m", "16Gi"); a bare YAML number (``cpu_request: 2``) is accepted.
Quantity = Annotated[
    str, BeforeValidator(lambda v: str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v)
]

#: Kueue's labels: the LocalQueue a workload is admitted through, and its WorkloadPriorityClass.
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"

STAGES = ("prep", "pretrain", "prep_instruct", "finetune", "evaluate", "register", "deploy", "playground")


class Toleration(StrictModel):
    key: str | None = None
    """Taint key (``None`` with ``Exists`` tolerates every taint)."""
    operator: Literal["Equal", "Exists"] = "Equal"
    """``Equal`` matches ``value``; ``Exists`` any value."""
    value: str | None = None
    """Taint value (with ``Equal``)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect (``None``: all)."""


class PvcMount(StrictModel):
    claim: str
    """Name of an existing PersistentVolumeClaim."""
    mount_path: str
    """Absolute path inside the container."""


class SecretEnv(StrictModel):
    """One key of a Kubernetes Secret exposed as an environment variable."""

    secret: str
    """Name of the Kubernetes Secret."""
    key: str
    """Key inside the Secret."""
    env: str
    """Environment variable name in the container."""


class SecretVolume(StrictModel):
    """A whole Kubernetes Secret mounted as files."""

    secret: str
    """Name of the Kubernetes Secret."""
    mount_path: str
    """Absolute path inside the container."""


class Resources(StrictModel):
    cpu_request: Quantity | None = None
    """Kubernetes quantity, for example ``"2"`` or ``"500m"``."""
    cpu_limit: Quantity | None = None
    """Kubernetes quantity."""
    memory_request: Quantity | None = None
    """Kubernetes quantity, for example ``"8Gi"``."""
    memory_limit: Quantity | None = None
    """Kubernetes quantity."""
    gpus: int = Field(default=0, ge=0)
    """``nvidia.com/gpu`` limit."""
    accelerator: str | None = None
    """Node accelerator type (the ``cloud.google.com/gke-accelerator``-style label value)."""
    gpu_memory_gib: float | None = Field(default=None, gt=0)
    """Memory of one GPU, for the memory planner (``kubellm check``, and before a training job is
    created). ``None``: read from ``accelerator`` (``nvidia-h100-80gb`` → 80, ``nvidia-l4`` → 24)."""


class Placement(StrictModel):
    """Where and how one pipeline task's pod runs."""

    resources: Resources = Resources()
    node_selector: dict[str, str] = {}
    """Node labels the pod must match."""
    tolerations: list[Toleration] = []
    pvcs: list[PvcMount] = []
    secret_env: list[SecretEnv] = []
    secret_volumes: list[SecretVolume] = []
    labels: dict[str, str] = {}
    """Extra pod labels."""
    annotations: dict[str, str] = {}
    """Extra pod annotations."""
    timeout_seconds: int | None = Field(default=None, ge=1)
    """Active deadline of the task's pod."""


class DistributedConfig(StrictModel):
    """Multi-process / multi-node training."""

    engine: Literal["none", "pytorchjob", "trainjob", "rayjob"] = "none"
    """``none`` trains in the step's own pod (or under a local ``torchrun``); ``pytorchjob`` /
    ``trainjob`` make the step create a Kubeflow training-operator job and wait for it; ``rayjob`` a
    KubeRay RayJob (a Ray cluster of ``nodes`` worker pods running the loop under Ray Train)."""
    nodes: int = Field(default=1, ge=1)
    """Nodes (pods) the training job runs on."""
    procs_per_node: int = Field(default=1, ge=1)
    """torchrun processes (``rayjob``: Ray Train workers) per node, usually GPUs per node."""
    min_nodes: int | None = Field(default=None, ge=1)
    """Elastic training: the smallest node count the job may run with (PyTorchJob only)."""
    max_nodes: int | None = Field(default=None, ge=1)
    """Elastic training: the largest node count (PyTorchJob only)."""
    backoff_limit: int = Field(default=3, ge=0)
    """Pod restarts before the job counts as failed (``rayjob``: Ray Train worker-group restarts,
    ``FailureConfig.max_failures``; each resumes from the last checkpoint)."""
    restart_policy: Literal["OnFailure", "Never", "ExitCode"] = "OnFailure"
    """What the operator does when a worker exits non-zero; a restarted worker resumes from the last checkpoint."""
    timeout_seconds: int = Field(default=24 * 3600, ge=60)
    """How long the step waits for the job before failing it."""
    shared_pvc: str | None = None
    """PersistentVolumeClaim through which data and checkpoints are shared with the job's pods (a
    ReadWriteMany volume: every node reads the data and rank 0 writes checkpoints). Mounted at
    ``/mnt/kubellm`` in the step's pod and in every job pod, so both see the same paths."""
    runtime: str = Field(default="torch-distributed", min_length=1, max_length=253)
    """ClusterTrainingRuntime a TrainJob references (``trainjob`` only). Its JobSet sets the restart
    policy and retry limit of the nodes: ``restart_policy`` and ``backoff_limit`` apply to PyTorchJobs."""
    ttl_seconds_after_finished: int = Field(default=300, ge=0)
    """``rayjob`` only: seconds KubeRay keeps the finished job's Ray cluster (pods, logs, dashboard) for
    a look before deleting it (``shutdownAfterJobFinishes``); the RayJob object and its status stay."""

    @model_validator(mode="after")
    def _elastic(self) -> DistributedConfig:
        if self.min_nodes and self.max_nodes and self.min_nodes > self.max_nodes:
            raise ValueError(f"min_nodes ({self.min_nodes}) is greater than max_nodes ({self.max_nodes})")
        if self.min_nodes or self.max_nodes:
            if self.engine in ("trainjob", "rayjob"):
                raise ValueError("elastic training (min_nodes/max_nodes) needs engine 'pytorchjob'")
            low, high = self.min_nodes or self.nodes, self.max_nodes or self.nodes
            if not low <= self.nodes <= high:
                raise ValueError(f"nodes ({self.nodes}) must lie within min_nodes..max_nodes ({low}..{high})")
        if self.engine != "none" and not self.shared_pvc:
            raise ValueError(f"engine {self.engine!r} needs shared_pvc to share data and checkpoints")
        return self


class DistributedStages(StrictModel):
    """Multi-node training per training stage (compile-time: it decides the step's PVC mounts)."""

    pretrain: DistributedConfig = DistributedConfig()
    """How the pretraining step trains."""
    finetune: DistributedConfig = DistributedConfig()
    """How the fine-tuning step trains."""


class RunLimits(StrictModel):
    """Limits of a whole pipeline run on KFP's backend (KFP 2.17's ``dsl.PipelineConfig``, compiled into the
    pipeline's ``platforms.kubernetes.pipelineConfig``), so that a forgotten run does not hold GPUs or
    volumes. ``None``: no limit (KFP's backend defaults). A local run ignores them."""

    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Seconds a run may take before KFP's backend stops it, whatever is still running (Argo's
    ``activeDeadlineSeconds``): allow the longest training plus its retries."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Seconds a finished run's workflow (and its pods, with their logs) is kept before the backend deletes
    it, whatever the outcome (Argo's ``ttlStrategy.secondsAfterCompletion``)."""
    ttl_seconds_after_success: int | None = Field(default=None, ge=0)
    """The same for a run that succeeded; overrides ``ttl_seconds_after_finished`` for it."""
    ttl_seconds_after_failure: int | None = Field(default=None, ge=0)
    """The same for a run that failed (keep its pods longer to read their logs); overrides
    ``ttl_seconds_after_finished`` for it."""

    def any(self) -> bool:
        return any(v is not None for v in self.model_dump().values())


class PlatformConfig(StrictModel):
    """Images and placement for running the pipelines on a cluster."""

    image: str = "ghcr.io/kubellm/kubellm:0.1.0"
    """Runtime image of every pipeline task (training, evaluation, registration)."""
    serving_image: str = "ghcr.io/kubellm/kubellm-serve:0.1.0"
    """Predictor image of the InferenceService."""
    playground_image: str = "ghcr.io/kubellm/kubellm-playground:0.1.0"
    """Image of the playground Deployment."""
    namespace: str = "kubellm"
    """Namespace of training jobs, InferenceServices and the playground."""
    service_account: str = "kubellm-pipeline"
    """Service account of pipeline pods and the predictor (see configs/cluster-rbac.yaml)."""
    image_pull_secrets: list[str] = []
    """Secrets used to pull the images from a private registry."""
    queue_name: str | None = Field(default=None, pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
    """Kueue LocalQueue (in ``namespace``) that training admits through: the ``kueue.x-k8s.io/queue-name``
    label on every training job (PyTorchJob, TrainJob, RayJob) and on the pipeline's training pods, so a
    sweep or several teams' recurring fine-tunes wait for the shared GPU quota instead of failing to
    schedule. ``None``: no queue (the scheduler alone decides)."""
    priority_class: str | None = Field(default=None, pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
    """Kueue WorkloadPriorityClass of those workloads (``kueue.x-k8s.io/priority-class``): which queued
    training is admitted first and which may be preempted. Needs ``queue_name``."""

    def queue_labels(self) -> dict[str, str]:
        """Kueue's labels for a training workload (empty without ``queue_name``)."""
        labels = {QUEUE_LABEL: self.queue_name} if self.queue_name else {}
        if self.priority_class:
            labels[PRIORITY_LABEL] = self.priority_class
        return labels

    default: Placement = Placement()
    """Placement of every task unless ``stages`` overrides it."""
    stages: dict[str, Placement] = {}
    """Per-stage placement (replaces ``default`` for that stage), keyed by stage name."""
    distributed: DistributedStages = DistributedStages()
    """Multi-node training of the pretraining and fine-tuning steps (``distributed.pretrain.engine:
    pytorchjob`` …); the default trains in the step's own pod."""
    run_limits: RunLimits = RunLimits()
    """Deadline and time-to-live of every pipeline run compiled with this config (see :class:`RunLimits`)."""

    @model_validator(mode="after")
    def _stage_names(self) -> PlatformConfig:
        if self.priority_class and not self.queue_name:
            raise ValueError("priority_class orders workloads in a Kueue queue: set queue_name too")
        unknown = sorted(set(self.stages) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; expected some of {list(STAGES)}")
        return self

    def placement(self, stage: str) -> Placement:
        return self.stages.get(stage, self.default)

    def distributed_for(self, stage: str) -> DistributedConfig:
        """The distributed settings of a training stage (``pretrain``/``finetune``; sweep trials share
        ``finetune``'s)."""
        return self.distributed.finetune if stage.startswith("finetune") else self.distributed.pretrain
