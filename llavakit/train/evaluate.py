"""Evaluation during training: the loss on --eval_data_path rows, over every process.

The eval loss is the sum of token losses over all eval rows divided by their supervised tokens (token-weighted,
like the training loss; transformers' Trainer averages per-batch means instead). Each process takes every
world_size-th slice of per_device_eval_batch_size rows; all run the same number of forward passes, so FSDP's
collectives line up (a process without rows or images runs as in training).
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager

import torch
from torch import nn

from llavakit.train.data import LlavaDataset
from llavakit.train.distributed import DistInfo, all_reduce_sums


def evaluate(module: nn.Module, dataset: LlavaDataset, batch_size: int, info: DistInfo, fsdp: bool,
             autocast: AbstractContextManager) -> dict[str, float]:
    """eval_loss and transformers' eval_runtime / eval_samples_per_second / eval_steps_per_second."""
    start = time.perf_counter()
    per_round = batch_size * info.world_size
    rounds = math.ceil(len(dataset) / per_round)
    loss_sum = tokens = 0.0
    was_training = module.training
    module.eval()  # no dropout
    try:
        with torch.no_grad():
            for k in range(rounds):
                first = k * per_round + info.rank * batch_size
                rows = range(first, min(first + batch_size, len(dataset)))
                batch = dataset.collate([dataset[i] for i in rows])
                images = all_reduce_sums([len(batch["pixel_values"])], info)[0]
                if not batch["indices"] and not info.enabled:
                    continue
                with autocast:
                    ce, n = module(batch["input_ids"].to(info.device), batch["labels"].to(info.device),
                                   [p.to(info.device) for p in batch["pixel_values"]], batch["image_sizes"],
                                   blank_image=fsdp and images > 0)
                loss_sum += float(ce)
                tokens += float(n)
    finally:
        module.train(was_training)
    loss_sum, tokens = all_reduce_sums([loss_sum, tokens], info)
    runtime = time.perf_counter() - start
    return {"eval_loss": loss_sum / tokens if tokens else math.nan, "eval_runtime": round(runtime, 4),
            "eval_samples_per_second": round(len(dataset) / runtime, 3),
            "eval_steps_per_second": round(rounds / runtime, 3)}
