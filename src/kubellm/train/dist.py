"""Process-group plumbing: one code path for a single process and for ``torchrun --nproc_per_node N``.

torchrun (and the Kubeflow training operators, which run torchrun in every pod) describe the job in the
environment of each worker: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``.
:func:`init_distributed` reads them when it is called (never at import) and joins the process group:
gloo on CPU, nccl on CUDA. Without them the job is one process and every collective here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    owns_group: bool = False
    """True when :func:`init_distributed` created the process group (and so tears it down)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes outputs, checkpoints and tracking data."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(env: Mapping[str, str] | None = None) -> DistContext:
    """Join the torchrun process group described by ``env`` (default: ``os.environ``), if any."""
    import torch
    import torch.distributed as dist

    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = f"cuda:{local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local_rank)
    if world <= 1:
        return DistContext(device=device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        owns = True
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, owns_group=owns)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group if this module created it."""
    import torch.distributed as dist

    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    import torch.distributed as dist

    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(ctx: DistContext, values: list[float]) -> list[float]:
    """Sum a few floats over all ranks (float64, so token counts stay exact)."""
    return _all_reduce(ctx, values, "SUM")


def all_reduce_max(ctx: DistContext, values: list[float]) -> list[float]:
    """The largest of each value over all ranks (e.g. the fullest rank's memory)."""
    return _all_reduce(ctx, values, "MAX")


def _all_reduce(ctx: DistContext, values: list[float], op: str) -> list[float]:
    if not ctx.distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.tolist()


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a SIGTERM seen by one worker)."""
    if not ctx.distributed:
        return flag
    return all_reduce_sum(ctx, [1.0 if flag else 0.0])[0] > 0


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
