"""Who this process is among the ranks that share one model, and the collectives they use.

Two process groups: `group` carries the model's own collectives (all-reduce after row-parallel layers and
the vocabulary-parallel embedding, all-gather of logits; NCCL on CUDA, gloo on CPU); `control` (always gloo,
on the host) carries rank 0's messages to the workers, which block on it between steps for as long as the
server idles.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Workers wait on the control group between requests: a server may idle for days.
IDLE_TIMEOUT = datetime.timedelta(days=365)


@dataclass
class TPGroup:
    """This process's place in a tensor-parallel group of `size` ranks (rank 0 drives, the others follow)."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None
    control: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (row-parallel partial products)."""
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along the last dimension (vocabulary-parallel logits)."""
        x = x.contiguous()
        if x.is_cuda:  # NCCL: one output tensor (what CUDA-graph capture takes), rank-major, then moved last
            out = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x, group=self.group)
            return out.movedim(0, -2).reshape(*x.shape[:-1], -1)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)

    def send(self, message: object) -> None:
        """Rank 0: one message to every worker."""
        dist.broadcast_object_list([message], src=0, group=self.control)

    def receive(self) -> object:
        """A worker: the next message from rank 0 (blocks until it comes)."""
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def min(self, value: int) -> int:
        """The smallest of every rank's `value` (e.g. KV blocks that fit on every device)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def gather_errors(self, error: str | None) -> list[str]:
        """Every rank's error message (None: fine), so one rank's failure reaches rank 0 in words."""
        out: list[str | None] = [None] * self.size
        dist.all_gather_object(out, error, group=self.control)
        return [f"rank {r}: {e}" for r, e in enumerate(out) if e]


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_group(rank: int, size: int, device: torch.device, init_method: str = "env://") -> TPGroup:
    """Join (or, under torchrun, reuse) the default process group; returns this rank's TPGroup."""
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=size,
                                timeout=IDLE_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT) if device.type == "cuda" else dist.group.WORLD
    return TPGroup(rank, size, dist.group.WORLD, control)


def torchrun_world() -> tuple[int, int] | None:
    """(rank, world size) when torchrun (or another launcher setting its variables) started this process."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: cuda:r on one machine (LOCAL_RANK under torchrun), the CPU otherwise."""
    if device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", rank))
    return torch.device("cuda", local)
