"""Data-parallel training through torchrun: one setup for single-process and multi-process runs.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is a single process. NCCL is
used on CUDA, gloo on CPU. Only rank 0 writes files and shows progress; what it saves is the
unwrapped model.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cuda" on a machine without CUDA is a clear error."""
    from core.errors import UserError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"--device {name!r}: choose auto, cpu or cuda")


HUGE_PAGES = "glibc.malloc.hugetlb=1"  # GLIBC_TUNABLES setting: glibc backs its large allocations with huge pages


def _has_huge_pages(environ) -> bool:
    return "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", "")


def with_huge_pages(environ: dict[str, str]) -> dict[str, str]:
    """A copy of `environ` whose GLIBC_TUNABLES also holds HUGE_PAGES (other tunables kept; an existing
    hugetlb setting left as it is), for starting a CPU training process."""
    if _has_huge_pages(environ):
        return dict(environ)
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (environ.get("GLIBC_TUNABLES", ""), HUGE_PAGES)))}


def cpu_allocator_hint(environ: dict[str, str] | None = None) -> str | None:
    """Advice for CPU training under glibc without huge pages, else None.

    glibc serves every allocation above 32 MB (most activations of a batch) with a fresh mmap and
    unmaps it on free, so each training step faults in gigabytes of 4 KiB pages; the kernel time
    that costs is about half the step on a 2-core CPU (docs/training.md, "CPU training"). glibc reads
    GLIBC_TUNABLES only at start-up, so the hint names the variable to set before the command.
    """
    environ = os.environ if environ is None else environ
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if _has_huge_pages(environ):
        return None
    return (f"CPU training: start the command with GLIBC_TUNABLES={HUGE_PAGES} in the environment "
            "(fewer page faults per step, faster training; docs/training.md, CPU training)")  # fmt: skip


def init_distributed_mode(device: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistInfo(device=resolve_device(device))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if resolved.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **({"device_id": resolved} if resolved.type == "cuda" else {}),
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel around `model` in a multi-process run; the model itself otherwise."""
    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (what checkpoints hold)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def sync_buffers(model: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (batch-norm running statistics) to every rank.

    DDP broadcasts them at the start of each forward, so after an epoch's last step each rank holds
    statistics updated by its own batch; validation and checkpoints must all use rank 0's.
    """
    if info.distributed:
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer.data, src=0)


def reduce_sums(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Sum each value over all ranks (identity in a single process)."""
    if not info.distributed:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64, device=_collective_device(info))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return dict(zip(keys, tensor.tolist(), strict=True))


def all_finite(value: torch.Tensor, info: DistInfo) -> bool:
    """Whether `value` is finite on every rank (so all ranks stop together on a NaN loss)."""
    finite = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if info.distributed:
        finite = finite.to(_collective_device(info))
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-item list in a single process)."""
    if not info.distributed:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def _collective_device(info: DistInfo) -> torch.device:
    return info.device if info.device.type == "cuda" else torch.device("cpu")
