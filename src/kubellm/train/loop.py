"""The one training loop behind ``kubellm pretrain`` and ``kubellm finetune``.

A plain PyTorch loop (the HF Trainer adds nothing here; a plain fp32 loop reaches ~65 % of the CPU's
matmul peak): AdamW without weight decay on norms and biases, linear warmup then cosine decay to
``min_lr_ratio``, gradient accumulation, global-norm clipping, bf16 autocast where the hardware has it,
optional gradient checkpointing, DDP under torchrun (gloo on CPU, nccl on CUDA), or FSDP2 sharding of
parameters, gradients and optimizer state with ``loop.parallelism: fsdp`` (:mod:`kubellm.train.sharding`).

Self-healing. Every ``checkpoint_every`` steps (and at the last step) rank 0 writes a checkpoint with the
trainable weights, optimizer, scheduler, every rank's RNG state and the data position
(:mod:`kubellm.train.checkpoint`); under FSDP every rank writes its own shard of the weights and optimizer
state (torch.distributed.checkpoint), and the run resumes on any number of processes. Running again with
the same output directory resumes from the newest complete checkpoint and continues the same LR curve and
the same data order, so a resumed run ends with the weights an uninterrupted one would have (bit for bit
in fp32 on a CPU; with ``loop.global_batch_size`` also on another number of processes, to the order of
floating-point sums). No checkpoint: a fresh start. A finished output directory: nothing to do, the
stored result is returned.

Preemption. Kubernetes stops a pod with SIGTERM and a grace period (30 s by default). The loop then
finishes the current optimizer step, writes a checkpoint and raises :class:`TrainingInterrupted`, whose
exit code is **143** (128 + SIGTERM), the code of a process killed by SIGTERM: the run did not finish, so
the task must not count as succeeded; KFP's retry policy (and the training operators' restart policy)
starts it again and the new attempt resumes from that checkpoint. Exit code 0 would mark an unfinished
model as done.

Trust. A resume starts from the newest checkpoint that passes verification (checksums, loadable,
finite weights; :func:`kubellm.train.checkpoint.load_latest_verified`), falling back to older ones. A
step whose loss or gradient norm is not finite (on any rank) changes no weight: its optimizer update is
skipped with a warning, and ``loop.max_nonfinite_steps`` such steps in a row stop the run with an error
(a diverged run, not a bad batch). A model with non-finite weights or a non-finite final loss is never
written as an output: random bytes in a checkpoint used to give an all-NaN model, ``final_loss: NaN``
and exit 0.

Outputs (rank 0 only), in ``out_dir``: the model files (``write_outputs`` of the stage), ``history.jsonl``
(one JSON line per logged step: ``step``, ``loss``, ``lr``, ``tokens_per_s`` and ``val_loss`` where
computed) and ``kubellm_train.json`` (the :class:`TrainResult`). They are staged in a temporary
directory and moved in with the weight files last and ``kubellm_train.json`` after them, so a directory
whose weights can be loaded is complete, and one with ``kubellm_train.json`` is finished.

Inside a Kubeflow TrainJob that offers it, rank 0 also reports progress %, the ETA, loss, learning rate
and tokens/s into the TrainJob's ``status.trainerStatus`` (:mod:`kubellm.train.trainer_status`), from a
thread of its own: a slow or failing endpoint never slows or fails a step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

from kubellm.config.train import LoopConfig, OptimConfig
from kubellm.errors import KubellmError, TrainingError
from kubellm.fsutil import claim_output, mark_output
from kubellm.log import Progress, get_logger
from kubellm.models.losses import IGNORE_INDEX, token_nll_sum
from kubellm.models.tensors import nonfinite_names
from kubellm.tracking.base import NullTracker, Tracker
from kubellm.train import checkpoint as ckpt
from kubellm.train import sharding
from kubellm.train.dist import DistContext

log = get_logger("kubellm.train")

RESULT_FILE = "kubellm_train.json"
HISTORY_FILE = "history.jsonl"
OUTPUT_KIND = "training-run"


@dataclass(frozen=True)
class TrainResult:
    """What a training stage produced (also written as ``kubellm_train.json``)."""

    output_dir: Path
    steps: int
    """Optimizer steps of the whole run (all attempts)."""
    final_loss: float
    """Mean training loss over the last logged window."""
    val_loss: float | None
    """Validation loss at the end (``None`` without a validation split)."""
    tokens_seen: int
    """Tokens processed by the whole job over the whole run (padding excluded)."""
    seconds: float
    """Wall time of this attempt (a resumed attempt counts only its own time)."""
    tokens_per_s: float
    """Training throughput of this attempt, all processes together."""
    resumed_from_step: int | None
    precision: str
    parameters: int
    trainable_parameters: int
    parallelism: str = "ddp"
    rank_state_bytes: int | None = None
    """Bytes of parameters (frozen ones included), gradients and optimizer state held by the fullest
    process after this attempt's first optimizer step, read from its tensors (local shards under fsdp)."""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "output_dir": str(self.output_dir)}

    @classmethod
    def read(cls, out_dir: str | Path) -> TrainResult:
        """The result stored in a finished output directory."""
        path = Path(out_dir) / RESULT_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            known = {f.name for f in fields(cls)}
            return cls(**{**{k: v for k, v in raw.items() if k in known}, "output_dir": Path(out_dir)})
        except (OSError, ValueError, TypeError) as err:
            raise TrainingError(f"{path}: unreadable training result ({err})") from None


class TrainingInterrupted(TrainingError):
    """SIGTERM (preemption): a checkpoint was written; rerun with the same output directory to resume."""

    exit_code = 143


@dataclass
class TrainJob:
    """What a stage hands to the loop: a model ready to train and its data."""

    stage: str
    """``pretrain`` or ``finetune`` (progress lines and tracker keys)."""
    model: Any
    """The model to train, on the CPU or already on the device; frozen parameters stay frozen."""
    train_split: Any
    """Rows with ``input_ids`` and ``labels`` (-100: not in the loss); a ``datasets.Dataset``."""
    val_split: Any | None
    pad_token_id: int
    loop: LoopConfig
    optim: OptimConfig
    write_outputs: Callable[[Any, Path, dict[str, Any] | None], None]
    """Writes the final model files (model or adapter, tokenizer, …) into the given directory; the third
    argument, when not ``None``, is the full trainable state to save instead of the model's own (the
    model is sharded then: ``save_pretrained(dir, state_dict=…)``)."""
    parameters: int
    trainable_parameters: int


def run_spec(loop: LoopConfig, optim: OptimConfig, **stage: Any) -> dict[str, Any]:
    """What identifies a run for resuming: the stage's inputs plus every setting that changes the
    weights it produces. Intervals, precision, workers and the process count may change between
    attempts (a retried pod may land on other hardware)."""
    schedule = loop.model_dump(include={"max_steps", "micro_batch_size", "grad_accum_steps", "seed"})
    # Recorded only when set, so run directories of earlier versions still resume: a global batch
    # size fixes the steps' rows whatever the process count; fsdp fixes the checkpoint format.
    schedule.update(loop.model_dump(include={"global_batch_size"}, exclude_none=True))
    if loop.parallelism != "ddp":
        schedule["parallelism"] = loop.parallelism
    return {**stage, "optim": optim.model_dump(), "loop": schedule}


def train(
    out_dir: str | Path, spec: dict[str, Any], build: Callable[[DistContext], TrainJob], tracker: Tracker | None = None
) -> TrainResult:
    """Run (or resume, or recognise as finished) the training described by ``spec`` in ``out_dir``.

    ``build`` makes the model and data once the process group is up; it is not called for a finished
    output directory. Under torchrun every rank calls this; only rank 0 writes.
    """
    from kubellm.train.dist import init_distributed, shutdown

    t0 = time.perf_counter()
    out = claim_run_dir(out_dir)
    ctx = init_distributed()
    try:
        ckpt.check_run_spec(out, spec)
        if (out / RESULT_FILE).is_file():
            log.info("%s already holds a finished run; nothing to do", out)
            return _finite_result(TrainResult.read(out))
        job = build(ctx)
        if ctx.is_main:  # only once the inputs loaded: a typo in a base model must not claim the dir
            ckpt.record_run_spec(out, spec)
            mark_output(out, OUTPUT_KIND, track_files=False)
        return _Trainer(job, out, ctx, tracker if ctx.is_main and tracker else NullTracker(), t0).fit()
    finally:
        shutdown(ctx)


def claim_run_dir(out_dir: str | Path, inputs: list[str | Path] | None = None) -> Path:
    """Check, before any work, that ``out_dir`` may hold this training run: new, empty, or a kubellm
    training run (resumed or returned as is), and holding none of ``inputs`` (the stage's data and base
    model). Run directories of older kubellm versions are recognised by their run spec or result."""
    return claim_output(
        out_dir, OUTPUT_KIND, inputs=inputs or [], legacy=(f"{ckpt.CHECKPOINTS}/{ckpt.RUN_SPEC}", RESULT_FILE)
    )


def _finite_result(result: TrainResult) -> TrainResult:
    """A stored result is returned only if its losses are finite (an older kubellm wrote NaN ones)."""
    if not all(math.isfinite(v) for v in (result.final_loss, result.val_loss or 0.0)):
        raise TrainingError(
            f"{result.output_dir}: holds a finished run whose final loss is {result.final_loss} "
            "(a broken model); delete the directory and train again"
        )
    return result


def grad_accum_steps(loop: LoopConfig, world_size: int, stage: str) -> int:
    """Micro-batches per optimizer step on each of ``world_size`` processes (see ``global_batch_size``)."""
    if loop.global_batch_size is None:
        return loop.grad_accum_steps
    per_micro = loop.micro_batch_size * world_size
    if loop.global_batch_size % per_micro:
        raise TrainingError(
            f"{stage}.loop.global_batch_size ({loop.global_batch_size}) is not a multiple of "
            f"micro_batch_size × processes ({loop.micro_batch_size} × {world_size}); pick a "
            f"micro_batch_size or a process count that divides it"
        )
    return loop.global_batch_size // per_micro


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at ``step`` (0-based): linear warmup, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: Any, optim: OptimConfig) -> Any:
    """AdamW over the trainable parameters; matrices decay, vectors (norms, biases) do not."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # Fused (one kernel over all tensors) where the parameters allow it: on the 125m preset a CPU step of
    # AdamW took 45 ms fused against 160–380 ms with the foreach default, 5–8 % of a bf16 step.
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=optim.lr, betas=(optim.beta1, optim.beta2), fused=fused or None
    )


def forward_logits(model: Any, batch: dict[str, Any]) -> Any:
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits


class _StopFlag:
    """Remember a SIGTERM instead of dying mid-step; restores the previous handler afterwards.

    A Python handler installed before (the MLflow stage run marks its run KILLED) still runs for its
    bookkeeping; if it then asks to exit (SystemExit), the exit happens at the step boundary instead,
    after the checkpoint, as :class:`TrainingInterrupted`.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        log.warning("SIGTERM received: checkpointing at the end of this step, then exiting (143)")
        if callable(self._previous):
            with contextlib.suppress(SystemExit):
                self._previous(signum, frame)

    def __enter__(self) -> _StopFlag:
        # Signal handlers can only be installed from the main thread (a component body is; a caller's
        # worker thread is not, and then preemption falls back to the default handling).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def _trainer_status(main: bool) -> Iterator[Any]:
    """Rank 0's reporter into the TrainJob's ``status.trainerStatus`` (None outside a TrainJob that
    offers it): :mod:`kubellm.train.trainer_status`."""
    from kubellm.train.trainer_status import from_env

    reporter = from_env() if main else None
    try:
        yield reporter
    finally:
        if reporter is not None:
            reporter.close()


class _Trainer:
    def __init__(self, job: TrainJob, out: Path, ctx: DistContext, tracker: Tracker, t0: float) -> None:
        import torch

        from kubellm.models.precision import resolve_precision

        self.job, self.out, self.ctx, self.tracker, self.t0 = job, out, ctx, tracker, t0
        self.loop, self.optim = job.loop, job.optim
        self.precision = resolve_precision(self.loop.precision, ctx.device)
        self.model = job.model
        # bitsandbytes weights cannot move; an empty (meta) copy is filled when sharded, below
        if not getattr(self.model, "is_loaded_in_4bit", False) and not sharding.on_meta(self.model):
            self.model.to(ctx.device)
        if getattr(self.model, "config", None) is not None:
            self.model.config.use_cache = False
        if self.loop.gradient_checkpointing:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if self.loop.compile_blocks:
            sharding.compile_blocks(self.model)
        self.accum = grad_accum_steps(self.loop, ctx.world_size, job.stage)
        self.sharded = self.loop.parallelism == "fsdp"
        if self.sharded and ctx.distributed:  # one process: nothing to shard, the checkpoints are DCP still
            full = self.model.state_dict() if ctx.is_main else {}  # rank 0's weights; the others are empty
            sharding.shard(
                self.model, bf16_weights=sharding.uses_bf16_weights(self.precision, self.loop.precision, ctx.device)
            )
            sharding.materialise(self.model, full, ctx.device)
            del full
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.named_trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = build_optimizer(self.model, self.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            partial(
                lr_factor, warmup=self.optim.warmup_steps, total=self.loop.max_steps, min_ratio=self.optim.min_lr_ratio
            ),
        )
        self.state = ckpt.TrainState(world_size=ctx.world_size)
        self.resumed_from: int | None = None
        self.rank_state_bytes: int | None = None

    # -- checkpoints ---------------------------------------------------------------------------------
    def _resume(self) -> None:
        import torch

        from kubellm.train.dist import broadcast_object

        if self.sharded:
            self._resume_sharded()
            return
        # Rank 0 verifies and picks; every rank learns the outcome, an error included (a rank left
        # waiting on a broadcast would hang the job until the collective timeout).
        c, found, error = None, None, None
        if self.ctx.is_main:
            try:
                c = ckpt.load_latest_verified(self.out)
                found = str(c.path) if c else None
            except TrainingError as err:
                error = err
        found, message = broadcast_object(self.ctx, (found, str(error) if error else None))
        if message is not None:
            raise error or TrainingError(message)
        if found is None:
            self._fresh_start()
            return
        path = Path(found)
        c = c or ckpt.load_checkpoint(path)
        if set(c.weights) != set(self.named_trainable):
            raise TrainingError(
                f"{path}: checkpoint weights do not match the model being trained "
                f"({len(c.weights)} tensors saved, {len(self.named_trainable)} trainable)"
            )
        with torch.no_grad():
            for name, p in self.named_trainable.items():
                p.copy_(c.weights[name])
        self.optimizer.load_state_dict(c.trainer["optimizer"])
        self._resumed(c)

    def _fresh_start(self) -> None:
        import torch

        # Dropout differs between ranks, the model init (seeded in build) does not.
        torch.manual_seed(self.loop.seed + 1 + self.ctx.rank)
        random.seed(self.loop.seed + self.ctx.rank)

    def _resume_sharded(self) -> None:
        """Every rank loads its part of the newest verified sharded checkpoint (DCP reshards it to this
        run's number of processes)."""
        target: dict[str, Any] = {}

        def structure() -> dict[str, Any]:
            target.update(sharding.train_state(self.model, self.optimizer))
            return target

        c = ckpt.load_latest_verified_sharded(self.out, self.ctx, structure)
        if c is None:
            self._fresh_start()
            return
        sharding.set_train_state(self.model, self.optimizer, target)
        self._resumed(c)

    def _resumed(self, c: ckpt.Checkpoint) -> None:
        """Scheduler, RNG and loop state of checkpoint ``c``, once its weights and optimizer are in."""
        import torch

        path = c.path
        self.scheduler.load_state_dict(c.trainer["scheduler"])
        if len(c.rng) == self.ctx.world_size:
            _set_rng_state(c.rng[self.ctx.rank])
        else:  # an elastic restart with another process count: fresh, still deterministic, streams
            log.warning(
                "%s was written by %d processes, resuming with %d: dropout RNG streams restart",
                path,
                len(c.rng),
                self.ctx.world_size,
            )
            torch.manual_seed(self.loop.seed + 1 + self.ctx.rank + c.state.step)
        self.state = c.state
        self.state.world_size = self.ctx.world_size
        self.resumed_from = c.state.step
        log.info("resuming from %s (step %d of %d)", path, c.state.step, self.loop.max_steps)

    def _checkpoint(self) -> None:
        from kubellm.train.dist import all_reduce_sum, gather_objects

        rngs = gather_objects(self.ctx, _rng_state())
        self.state.window = all_reduce_sum(self.ctx, self.window)
        self.state.window_seconds = time.perf_counter() - self.t_window
        error = None
        try:
            if self.sharded:  # every rank writes its shard
                path = ckpt.save_sharded_checkpoint(
                    self.out,
                    self.state,
                    self.ctx,
                    train_state=sharding.train_state(self.model, self.optimizer),
                    trainer={"scheduler": self.scheduler.state_dict()},
                    rng=rngs,
                    keep=self.loop.keep_checkpoints,
                )
                if self.ctx.is_main:
                    log.info("checkpoint %s", path)
            elif self.ctx.is_main:
                path = ckpt.save_checkpoint(
                    self.out,
                    self.state,
                    weights=self.named_trainable,
                    rng=rngs,
                    keep=self.loop.keep_checkpoints,
                    trainer={"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                )
                log.info("checkpoint %s", path)
        except KubellmError as err:  # a full disk: every rank stops with the same line
            error = err
        # Nobody moves on (or exits on SIGTERM) before the checkpoint is on disk: torchrun tears down
        # the remaining workers as soon as one of them exits.
        messages = [m for m in gather_objects(self.ctx, str(error) if error else None) if m is not None]
        if messages:
            raise error or TrainingError(messages[0])

    # -- data ----------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict[str, Any]]:
        import torch

        from kubellm.train.batches import PadCollator, StreamSampler

        sampler = StreamSampler(
            len(self.job.train_split),
            self.loop.micro_batch_size,
            seed=self.loop.seed,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            start=self.state.samples_seen,
        )
        # A generator of its own: the DataLoader draws a base seed from it, and drawing from the global
        # RNG would shift dropout masks between a resumed and an uninterrupted run.
        loader = torch.utils.data.DataLoader(
            self.job.train_split,
            batch_sampler=sampler,
            collate_fn=PadCollator(self.job.pad_token_id),
            num_workers=self.loop.num_workers,
            generator=torch.Generator().manual_seed(self.loop.seed),
            persistent_workers=self.loop.num_workers > 0,
        )
        return iter(loader)

    def _val_loss(self) -> float | None:
        import torch

        from kubellm.models.precision import autocast
        from kubellm.train.batches import PadCollator
        from kubellm.train.dist import all_reduce_sum

        val = self.job.val_split
        if val is None or len(val) == 0:
            return None
        collate, mbs = PadCollator(self.job.pad_token_id), self.loop.micro_batch_size
        nll = count = 0.0
        # The same first `eval_batches` batches every time, split round-robin over the ranks, so the
        # figure does not depend on the number of processes.
        batches = min(self.loop.eval_batches, math.ceil(len(val) / mbs))
        mine = list(range(self.ctx.rank, batches, self.ctx.world_size))
        # A sharded forward is a collective: every rank runs as many as the busiest one, those past its
        # own batches on its first one again, not counted.
        rounds = math.ceil(batches / self.ctx.world_size) if self.sharded else len(mine)
        self.model.eval()
        with torch.no_grad():
            for i in range(rounds):
                b = mine[i] if i < len(mine) else mine[0] if mine else 0
                rows = list(range(b * mbs, min((b + 1) * mbs, len(val))))
                batch = {k: v.to(self.ctx.device) for k, v in collate(val.__getitems__(rows)).items()}
                with autocast(self.precision, self.ctx.device):
                    logits = forward_logits(self.model, batch)
                if i < len(mine):
                    nll += token_nll_sum(logits, batch["labels"]).item()
                    count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.model.train()
        nll, count = all_reduce_sum(self.ctx, [nll, count])
        return nll / count if count else None

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        from kubellm.models.precision import cpu_bf16_fast_path
        from kubellm.train.dist import all_reduce_sum, any_rank, barrier

        self._resume()
        if self.ctx.is_main:
            self.tracker.log_params(
                {
                    "stage": self.job.stage,
                    "precision": self.precision,
                    "world_size": self.ctx.world_size,
                    "parallelism": self.loop.parallelism,
                    "parameters": self.job.parameters,
                    "trainable_parameters": self.job.trainable_parameters,
                }
            )
            self._write_history(self.out / HISTORY_FILE)
        wrapped = self.model
        if self.ctx.distributed and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(
                self.model, device_ids=[self.ctx.local_rank] if self.ctx.device.startswith("cuda") else None
            )
        loop = self.loop
        batches = self._batches() if self.state.step < loop.max_steps else iter(())
        # The logging window (summed nll, target tokens, input tokens) carries over a resume, so the
        # first record after it covers the same steps as in an uninterrupted run; rank 0 holds the sums.
        self.window = list(self.state.window) if self.ctx.is_main else [0.0, 0.0, 0.0]
        self.t_window = time.perf_counter() - self.state.window_seconds
        attempt_tokens, t_loop = 0.0, time.perf_counter()
        shown: dict[str, Any] = {}
        with (
            Progress(
                loop.max_steps,
                self.job.stage,
                every=loop.log_every,
                start=self.state.step,
                logger=log,
                enabled=self.ctx.is_main,
            ) as progress,
            _StopFlag() as stop,
            cpu_bf16_fast_path(self.model, self.precision, self.ctx.device),
            _trainer_status(self.ctx.is_main) as status,
        ):
            while self.state.step < loop.max_steps:
                tokens, grad_norm, lr = self._step(wrapped, batches)
                attempt_tokens += tokens
                step = self.state.step
                last = step == loop.max_steps
                evaluate = last or (loop.eval_every is not None and step % loop.eval_every == 0)
                if last or evaluate or step % loop.log_every == 0:
                    shown = self._log(step, lr, grad_norm, evaluate)
                progress.update(step, **shown)
                if status is not None:  # a TrainJob's status.trainerStatus: handed to a thread, never waited for
                    status.update(step, loop.max_steps, progress.eta(step), shown)
                stopping = any_rank(self.ctx, stop.signum is not None)
                if stopping or last or step % loop.checkpoint_every == 0:
                    self._checkpoint()
                if stopping and not last:
                    raise TrainingInterrupted(
                        f"stopped by SIGTERM at step {step}/{loop.max_steps}; checkpoint written under "
                        f"{self.out / ckpt.CHECKPOINTS}; rerun with the same output directory to resume"
                    )
        (attempt_tokens,) = all_reduce_sum(self.ctx, [attempt_tokens])
        seconds = time.perf_counter() - t_loop
        result = self._finish(attempt_tokens / seconds if attempt_tokens else 0.0)
        barrier(self.ctx)
        return result

    def _step(self, wrapped: Any, batches: Iterator[dict[str, Any]]) -> tuple[int, float, float]:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns (input tokens of this rank,
        gradient norm before clipping, the learning rate used)."""
        from kubellm.models.precision import autocast
        from kubellm.train.dist import all_reduce_max, all_reduce_sum

        device, world = self.ctx.device, self.ctx.world_size
        micro = [{k: v.to(device, non_blocking=True) for k, v in next(batches).items()} for _ in range(self.accum)]
        targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in micro)
        # The step's loss is the mean over every target token of every micro-batch of every rank; DDP
        # and FSDP average gradients over the ranks, hence × world.
        (step_targets,) = all_reduce_sum(self.ctx, [targets])
        scale = world / max(step_targets, 1)
        nll_sum = 0.0
        for i, batch in enumerate(micro):
            # FSDP reduce-scatters every micro-batch's gradients into the sharded ones: holding them
            # unsharded until the last would cost the memory sharding saves.
            sync = i == len(micro) - 1 or not self.ctx.distributed or self.sharded
            with contextlib.nullcontext() if sync else wrapped.no_sync():
                with autocast(self.precision, device):
                    logits = forward_logits(wrapped, batch)
                nll = token_nll_sum(logits, batch["labels"])
                (nll * scale).backward()
            nll_sum += nll.item()
        # max_norm=inf measures the norm and clips nothing
        grad_norm = sharding.clip_grad_norm(self.params, self.optim.grad_clip or math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        finite = self._finite_step(nll_sum / max(targets, 1), grad_norm)
        if finite:
            self.optimizer.step()
        if self.rank_state_bytes is None and finite:  # once per attempt, while gradients and state exist
            (self.rank_state_bytes,) = all_reduce_max(
                self.ctx, [sum(sharding.state_bytes(self.model, self.optimizer).values())]
            )
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.samples_seen += world * self.loop.micro_batch_size * self.accum
        for i, v in enumerate((nll_sum, targets, tokens) if finite else (0.0, 0, tokens)):
            self.window[i] += v
        return tokens, grad_norm, lr

    def _finite_step(self, loss: float, grad_norm: float) -> bool:
        """Whether this step's loss and gradient norm are finite on every rank. A step that is not keeps
        the weights (its update is skipped, the schedule moves on); ``loop.max_nonfinite_steps`` of them
        in a row stop the run: the weights have diverged, and continuing would only write NaN."""
        from kubellm.train.dist import any_rank

        if not any_rank(self.ctx, not (math.isfinite(loss) and math.isfinite(grad_norm))):
            self.state.nonfinite_streak = 0
            return True
        self.state.nonfinite_streak += 1
        self.state.skipped_steps += 1
        step, streak, limit = self.state.step + 1, self.state.nonfinite_streak, self.loop.max_nonfinite_steps
        log.warning(
            "step %d: loss %.4g, gradient norm %.4g: not finite, optimizer step skipped (%d in a row, stop at %d)",
            step,
            loss,
            grad_norm,
            streak,
            limit,
        )
        if streak >= limit:
            raise TrainingError(
                f"{self.job.stage}: the loss or gradient norm was not finite for {streak} consecutive steps "
                f"({step - streak + 1}-{step}, loop.max_nonfinite_steps={limit}): training diverged; no model "
                f"was written; lower optim.lr, check the data or the checkpoints under {self.out / ckpt.CHECKPOINTS}, "
                "then rerun"
            )
        return False

    def _log(self, step: int, lr: float, grad_norm: float, evaluate: bool) -> dict[str, Any]:
        """Close the logging window: one history line, tracker metrics; returns what progress shows."""
        from kubellm.train.dist import all_reduce_sum

        nll_sum, n_targets, n_tokens = all_reduce_sum(self.ctx, self.window)
        # a window of only skipped steps has no loss to show (not 0)
        record: dict[str, Any] = {
            "step": step,
            "loss": nll_sum / n_targets if n_targets else math.nan,
            "lr": lr,
            "tokens_per_s": n_tokens / max(time.perf_counter() - self.t_window, 1e-9),
        }
        val = self._val_loss() if evaluate else None
        if val is not None:
            record["val_loss"] = val
        self._record(record, grad_norm)
        self.state.tokens_seen += int(n_tokens)
        self.window, self.t_window = [0.0, 0.0, 0.0], time.perf_counter()
        return {k: v for k, v in record.items() if k != "step"}

    def _record(self, record: dict[str, Any], grad_norm: float) -> None:
        self.state.history.append(record)
        if not self.ctx.is_main:
            return
        with (self.out / HISTORY_FILE).open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        metrics = {k: float(v) for k, v in record.items() if k != "step"}
        self.tracker.log_metrics({**metrics, "grad_norm": grad_norm}, step=record["step"])

    def _write_history(self, path: Path) -> None:
        """(Re)write the history up to the resumed step: lines logged after the checkpoint are gone."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.state.history), encoding="utf-8")
        os.replace(tmp, path)

    def _finish(self, tokens_per_s: float) -> TrainResult:
        history = self.state.history
        last_val = next((r["val_loss"] for r in reversed(history) if "val_loss" in r), None)
        self._check_finite(history[-1]["loss"] if history else math.nan, last_val)
        result = TrainResult(
            output_dir=self.out,
            steps=self.state.step,
            final_loss=history[-1]["loss"] if history else math.nan,
            val_loss=last_val,
            tokens_seen=self.state.tokens_seen,
            seconds=round(time.perf_counter() - self.t0, 3),
            tokens_per_s=tokens_per_s,
            resumed_from_step=self.resumed_from,
            precision=self.precision,
            parameters=self.job.parameters,
            trainable_parameters=self.job.trainable_parameters,
            parallelism=self.loop.parallelism,
            rank_state_bytes=int(self.rank_state_bytes) if self.rank_state_bytes is not None else None,
        )
        # Sharded weights are gathered once, tensor by tensor, into rank 0's CPU memory (every rank takes
        # part): the exported model is one consolidated Hugging Face directory, as DDP writes it.
        full = sharding.gather_trainable(self.model) if self.sharded and self.ctx.distributed else None
        if not self.ctx.is_main:
            return result
        if getattr(self.model, "config", None) is not None:
            self.model.config.use_cache = True
        from kubellm.fsutil import io_errors, write_json_atomic

        kept = ckpt.latest_complete(self.out)
        then = f"; the checkpoint {kept.name} is kept: make room and rerun to write the model" if kept else ""
        with io_errors(self.out, "cannot write the trained model", then):
            stage_dir = Path(tempfile.mkdtemp(prefix=".outputs.tmp-", dir=self.out))
            try:
                self.job.write_outputs(self.model, stage_dir, full)
                self._write_history(stage_dir / HISTORY_FILE)
                _publish(stage_dir, self.out)
            finally:
                shutil.rmtree(stage_dir, ignore_errors=True)

        write_json_atomic(self.out / RESULT_FILE, result.to_json())
        _readable(self.out / RESULT_FILE)
        ckpt.remove_checkpoints(self.out)
        self.tracker.log_metrics(
            {
                "final_loss": result.final_loss,
                "tokens_seen": float(result.tokens_seen),
                **({"rank_state_bytes": float(result.rank_state_bytes)} if result.rank_state_bytes is not None else {}),
                **({"final_val_loss": last_val} if last_val is not None else {}),
            },
            step=result.steps,
        )
        log.info(
            "%s done: %d steps, loss %.4f, %s, %.0f tokens/s -> %s",
            self.job.stage,
            result.steps,
            result.final_loss,
            f"val_loss {last_val:.4f}" if last_val is not None else "no validation",
            tokens_per_s,
            self.out,
        )
        return result

    def _check_finite(self, final_loss: float, val_loss: float | None) -> None:
        """Every rank refuses to finish with NaN or infinite weights or losses: no output is written."""
        from kubellm.train.dist import gather_objects

        mine = nonfinite_names(dict(self.model.named_parameters()))
        bad = list(dict.fromkeys(n for names in gather_objects(self.ctx, mine) for n in names))
        if bad or not math.isfinite(final_loss) or not math.isfinite(val_loss or 0.0):
            what = (
                f"{len(bad)} weight tensors hold NaN or infinite values (e.g. {bad[0]})"
                if bad
                else f"final loss {final_loss}, validation loss {val_loss}"
            )
            raise TrainingError(f"{self.job.stage}: {what}; no model was written to {self.out}")
        if self.state.skipped_steps:
            log.warning("optimizer steps skipped for a non-finite loss or gradient norm: %d", self.state.skipped_steps)


def _publish(staged: Path, out: Path) -> None:
    """Move staged outputs into ``out``: weight files last, so loadable weights mean a complete dir."""

    def weights_last(p: Path) -> tuple[bool, str]:
        return (p.is_file() and p.suffix == ".safetensors", p.name)

    for item in sorted(staged.iterdir(), key=weights_last):
        _readable(item)
        dest = out / item.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(item, dest)


def _readable(path: Path) -> None:
    """Temporary files are created 0600; outputs are read by other pods (serving, evaluation) that may
    run as another user on a shared volume, so make them world-readable like any saved model."""
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
