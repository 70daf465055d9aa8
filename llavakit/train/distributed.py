"""One process or many under torchrun: process-group setup, DDP / FSDP wrapping, reductions.

gloo on CPU, NCCL on CUDA. FSDP is FSDP2 (`fully_shard`): one unit per decoder layer and per vision
layer, the rest in the root unit; parameter names stay those of the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from llavakit.models.clip import CLIPEncoderLayer
from llavakit.models.llama import LlamaDecoderLayer


@dataclass(slots=True)
class DistInfo:
    """Where this process stands: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu" if device == "auto" else device)
    if world == 1:
        return DistInfo(device=dev)
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev)


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def wrap(module: nn.Module, mode: str, info: DistInfo, sharding: str = "full_shard",
         cpu_offload: bool = False) -> nn.Module:
    """DDP or FSDP around the training module (whose forward computes the loss). FSDP `sharding`: full_shard
    (parameters freed after each layer's forward: ZeRO-3) or shard_grad_op (kept until the backward: ZeRO-2);
    `cpu_offload` keeps sharded parameters and gradients in CPU memory (CUDA only)."""
    if not info.enabled:
        return module
    if mode in ("auto", "ddp"):
        # Text-only batches leave the projector unused: DDP must not wait for its gradients.
        return nn.parallel.DistributedDataParallel(module, device_ids=[info.device] if info.device.type == "cuda"
                                                   else None, find_unused_parameters=True)
    fully_shard = _fully_shard()
    options = {"reshard_after_forward": sharding == "full_shard"}
    if cpu_offload and info.device.type == "cuda":
        from torch.distributed.fsdp import CPUOffloadPolicy

        options["offload_policy"] = CPUOffloadPolicy()
    for sub in module.modules():
        if isinstance(sub, (LlamaDecoderLayer, CLIPEncoderLayer)):
            fully_shard(sub, **options)
    fully_shard(module, **options)
    return module


def all_reduce_sum(value: float | int, info: DistInfo) -> float:
    """Sum of a number over all processes."""
    return all_reduce_sums([value], info)[0]


def all_reduce_sums(values: list[float | int], info: DistInfo) -> list[float]:
    """Element-wise sums of a list of numbers over all processes (one collective)."""
    if not info.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(items: list, info: DistInfo) -> list:
    """Every process's `items` (picklable), concatenated in rank order."""
    if not info.enabled:
        return list(items)
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
