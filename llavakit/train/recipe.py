"""The training recipe, top to bottom: `setup(cfg)`, `train_loop(run)`, `cleanup(run)`.

One global batch = per_device_train_batch_size x world size x gradient_accumulation_steps samples. The
loss is the sum of token losses over the whole global batch divided by its number of supervised
tokens, so one process and N processes with the same global batch compute the same loss.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llavakit.config import IGNORE_INDEX
from llavakit.models.llava import LlavaForConditionalGeneration
from llavakit.processing.media import FetchPolicy
from llavakit.processing.prompt import PromptProcessor
from llavakit.train import checkpoint as ckpt
from llavakit.train.build import build_model, param_groups, set_trainable
from llavakit.train.config import TrainConfig
from llavakit.train.data import (
    LlavaDataset,
    ModalityGroupedBatches,
    image_folder_hint,
    load_records,
    missing_image_files,
)
from llavakit.train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    all_reduce_sums,
    init_distributed,
    wrap,
)
from llavakit.train.distributed import cleanup as dist_cleanup
from llavakit.train.lora import apply_lora, load_adapter
from llavakit.train.metrics import TrainLogger, plot_loss_curve
from llavakit.weights.save import unused_source_tensors


class TrainingError(RuntimeError):
    """Training cannot go on (too much bad data, a diverged loss); the message says why."""


class LossModule(nn.Module):
    """The module DDP/FSDP wrap: its forward runs the model's three steps and returns the summed
    token loss and the number of supervised tokens.

    With `blank_image` a batch without images still runs the vision tower and projector, on a blank image whose
    features count 0 in the loss. Under FSDP the recipe asks for it on the ranks without images when another rank
    has some, so the sharded tower's all-gathers and gradient reductions happen on every rank, in the same order
    (the original LLaVA feeds a zero image to text-only rows under ZeRO-3 for the same reason).
    """

    def __init__(self, model: LlavaForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, pixel_values: list[torch.Tensor],
                image_sizes: list[tuple[int, int]], blank_image: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        feats = m.encode_images(pixel_values, image_sizes) if pixel_values else None
        # Before the language model, where real images run: FSDP orders its backward prefetches by forward order.
        blank = self._blank_features(input_ids.device) if blank_image and not pixel_values else None
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        hidden = m(m.embed_inputs(input_ids, feats), positions)  # (B, T, D)
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        # Only supervised positions go through the LM head: no (B, T, vocab) logits tensor.
        logits = m.compute_logits(hidden[:, :-1][mask]).float()
        loss = F.cross_entropy(logits, targets[mask], reduction="sum")
        if blank is not None:
            loss = loss + 0.0 * blank.sum()
        return loss, mask.sum()

    def _blank_features(self, device: torch.device) -> torch.Tensor:
        vision = self.model.cfg.vision
        size = vision.image_size
        blank = torch.zeros(1, vision.num_channels, size, size, device=device)  # (tiles, C, S, S)
        return self.model.encode_images([blank], [(size, size)])[0]


@dataclass
class StepInfo:
    """What one optimizer step did (passed to callbacks and logged)."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_s: float
    skipped: int


@dataclass
class Run:
    """Everything setup() builds."""

    cfg: TrainConfig
    info: DistInfo
    model: LlavaForConditionalGeneration
    module: nn.Module
    processor: PromptProcessor
    dataset: LlavaDataset
    batches: ModalityGroupedBatches
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    logger: TrainLogger
    output_dir: Path
    extra_tensors: dict[str, torch.Tensor]
    save_dtype: torch.dtype
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    skipped: dict[int, str] = field(default_factory=dict)
    nonfinite_streak: int = 0
    history: list[StepInfo] = field(default_factory=list)


def train(cfg: TrainConfig, callbacks: list[Callable[[StepInfo], None]] = ()) -> list[StepInfo]:
    """Train as `cfg` says; returns the per-step history. Callbacks run after every step on every rank."""
    run = setup(cfg)
    try:
        train_loop(run, callbacks)
        finish(run)
    finally:
        cleanup(run)
    return run.history


def setup(cfg: TrainConfig) -> Run:
    info = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    records = load_records(cfg.data_path)  # read and checked before the model loads: bad data fails in seconds
    check_image_files(records, _image_folder(cfg), cfg.max_bad_fraction)
    resume = ckpt.resolve_resume(cfg.resume_from_checkpoint, output_dir)
    model, processor, source = _model(cfg, info, resume)
    dataset = _dataset(cfg, records, processor, output_dir)
    global_batch = cfg.per_device_train_batch_size * info.world_size * cfg.gradient_accumulation_steps
    batches = ModalityGroupedBatches(len(dataset), [dataset.modality(i) for i in range(len(dataset))], global_batch,
                                     cfg.seed, cfg.group_by_modality_length, drop_last=info.enabled)
    steps_per_epoch = len(batches.batches(0))
    if steps_per_epoch == 0:
        raise TrainingError(f"{len(dataset)} rows make no full global batch of {global_batch}; "
                            "lower the batch size or add data")
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    module = wrap(LossModule(model), cfg.distributed, info)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
    save_dtype = getattr(torch, cfg.save_dtype) if cfg.save_dtype else ckpt.weights_dtype(source)
    run = Run(cfg, info, model, module, processor, dataset, batches, optimizer, scheduler,
              TrainLogger(output_dir, info.is_main), output_dir, _extra_tensors(cfg, model, source), save_dtype,
              steps_per_epoch, total)
    if resume is not None:
        run.step = ckpt.restore_training_state(resume, module, optimizer, scheduler)
    return run


def _model(cfg: TrainConfig, info: DistInfo, resume: Path | None):
    """The model for the stage, its weights from `resume` when resuming; trainable parts set."""
    weights_from = resume if resume is not None and cfg.stage != "lora" else None
    build_cfg = cfg if weights_from is None else dataclasses.replace(cfg, model=str(weights_from), stage="finetune")
    model, processor, source = build_model(build_cfg, info.device)
    if cfg.stage == "lora":
        if resume is not None:
            load_adapter(model, resume)  # adapter and projector
        else:
            apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    set_trainable(model, cfg)
    model.language_model.checkpoint_layers = cfg.gradient_checkpointing
    return model.train(), processor, source


def _image_folder(cfg: TrainConfig) -> Path | None:
    return Path(cfg.image_folder) if cfg.image_folder else None


def check_image_files(records: list, image_folder: Path | None, max_bad_fraction: float) -> None:
    """Refuse, before any model loads, data whose missing image files alone would stop training (more rows
    than max_bad_fraction allows): typically a missing or wrong --image-folder."""
    missing = missing_image_files(records, image_folder)
    rows = len({i for i, _ in missing})
    if rows > max_bad_fraction * len(records):
        first = ", ".join(str(p) for _, p in missing[:3])
        raise TrainingError(f"{rows} of {len(records)} rows name image files that do not exist, more than "
                            f"max_bad_fraction (--max-bad-fraction) {max_bad_fraction} allows; not found: {first}"
                            f"{' ...' if len(missing) > 3 else ''} ({image_folder_hint(image_folder)})")


def _dataset(cfg: TrainConfig, records: list, processor: PromptProcessor, output_dir: Path) -> LlavaDataset:
    cache = Path(cfg.image_cache_dir) if cfg.image_cache_dir else output_dir / "image_cache"
    return LlavaDataset(records, processor, processor.template, _image_folder(cfg), cfg.model_max_length, cache,
                        FetchPolicy())


def _extra_tensors(cfg: TrainConfig, model: LlavaForConditionalGeneration, source: Path) -> dict:
    """Tower tensors llavakit never built, carried into saved checkpoints so transformers finds them."""
    if cfg.stage == "lora":
        return {}
    if cfg.stage == "pretrain":
        clip = dataclasses.replace(model.cfg, layout="clip", vision_tower_dir=None)
        return unused_source_tensors(Path(cfg.vision_tower), clip)
    return unused_source_tensors(source, model.cfg)


def lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Learning-rate multiplier per step: linear warmup over warmup_ratio, then the schedule."""
    warmup = math.ceil(cfg.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup and cfg.lr_scheduler_type != "constant":
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if cfg.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0
    return factor


def split_by_length(rows: list[int], length: Callable[[int], int], pieces: int) -> list[list[int]]:
    """`rows` sorted by `length` (ties in their order) and cut into `pieces` runs of near-equal size,
    shortest first; with fewer rows than pieces some are empty."""
    rows = sorted(rows, key=length)
    cuts = [round(k * len(rows) / pieces) for k in range(pieces + 1)]
    return [rows[a:b] for a, b in pairwise(cuts)]


def _rank_micro_batches(run: Run, epoch: int, first_step: int) -> list[list[int]]:
    """This rank's micro-batches for the rest of the epoch, `_micro_per_step` per step, in order."""
    cfg, info = run.cfg, run.info
    size, split = cfg.per_device_train_batch_size, cfg.micro_batches_by_length
    out = []
    for batch in run.batches.batches(epoch)[first_step:]:
        chunks = [batch[i:i + size] for i in range(0, len(batch), size)]
        mine = chunks[info.rank::info.world_size]
        mine += [[] for _ in range(cfg.gradient_accumulation_steps - len(mine))]
        for chunk in mine:
            out += split_by_length(chunk, run.dataset.length, split) if split > 1 else [chunk]
    return out


def _micro_per_step(cfg: TrainConfig) -> int:
    return cfg.gradient_accumulation_steps * cfg.micro_batches_by_length


def _step_batches(run: Run):
    """(epoch, list of collated micro-batches) for every remaining step."""
    accum = _micro_per_step(run.cfg)
    while run.step < run.total_steps:
        epoch, first = divmod(run.step, run.steps_per_epoch)
        micro = _rank_micro_batches(run, epoch, first)
        # Its own generator: creating a DataLoader iterator draws a seed, which must not move the global
        # RNG (dropout masks) differently in a resumed run.
        loader = torch.utils.data.DataLoader(run.dataset, batch_sampler=micro, collate_fn=run.dataset.collate,
                                             num_workers=run.cfg.dataloader_num_workers,
                                             generator=torch.Generator().manual_seed(run.cfg.seed + epoch))
        pending = []
        for batch in loader:
            pending.append(batch)
            if len(pending) == accum:
                yield epoch, pending
                pending = []
                if run.step >= run.total_steps:
                    return


def train_loop(run: Run, callbacks) -> None:
    cfg = run.cfg
    # A context: an error ends the progress bar's line before it is printed.
    with tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step", disable=not run.info.is_main) as bar:
        for epoch, micro in _step_batches(run):
            start, lr = time.perf_counter(), run.scheduler.get_last_lr()[0]
            _account_skipped(run, micro)  # bad rows are reported, and the limit checked, before the step runs
            loss_sum, tokens, seen = _forward_backward(run, micro)
            # A step whose every row was skipped has nothing to learn: no update, and the data moves on.
            grad_norm = _optimizer_step(run, loss_sum) if tokens else math.nan
            run.step += 1
            info = StepInfo(run.step, loss_sum, lr, grad_norm, int(tokens),
                            seen / max(time.perf_counter() - start, 1e-9), len(run.skipped))
            run.history.append(info)
            if run.step % cfg.logging_steps == 0 or run.step == run.total_steps:
                run.logger.log({"epoch": epoch, **dataclasses.asdict(info)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{info.lr:.2e}")
            if run.step % cfg.save_steps == 0 and run.step < run.total_steps:
                save(run, run.output_dir / f"checkpoint-{run.step}")
            for callback in callbacks:
                callback(info)
    if run.history and not any(s.tokens for s in run.history):
        raise TrainingError(f"no step had a row to learn from: all {len(run.skipped)} rows read were skipped (each "
                            "listed above with its reason); fix the data")


def _forward_backward(run: Run, micro: list[dict]) -> tuple[float, float, float]:
    """Accumulate gradients over the step's micro-batches; returns (mean token loss, supervised tokens,
    input tokens/s numerator). A step without supervised tokens (all its rows skipped) runs nothing."""
    info = run.info
    counts = all_reduce_sums([sum(b["num_tokens"] for b in micro), *(len(b["pixel_values"]) for b in micro)], info)
    total_tokens, images = counts[0], counts[1:]  # images: per micro-step, over all ranks
    if total_tokens == 0:
        return math.nan, 0, 0
    fsdp = info.enabled and run.cfg.distributed == "fsdp"
    loss_sum, seen = 0.0, 0
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=run.cfg.bf16)
    for batch, any_rank_images in zip(micro, images, strict=True):
        if not batch["indices"] and not info.enabled:
            continue  # all its rows skipped; under torchrun the empty batch still runs: every rank takes part
        with autocast:
            ce, _ = run.module(batch["input_ids"].to(info.device), batch["labels"].to(info.device),
                               [p.to(info.device) for p in batch["pixel_values"]], batch["image_sizes"],
                               blank_image=fsdp and any_rank_images > 0)
        # DDP/FSDP average gradients over ranks: scale by world size so the global sum / tokens results.
        (ce * info.world_size / total_tokens).backward()
        loss_sum += float(ce.detach())
        seen += int((batch["input_ids"] != run.dataset.pad_id).sum())
    return all_reduce_sum(loss_sum, info) / total_tokens, total_tokens, all_reduce_sum(seen, info)


def _optimizer_step(run: Run, loss: float) -> float:
    params = [p for p in run.module.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.max_grad_norm)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not (math.isfinite(loss) and math.isfinite(norm)):
        run.nonfinite_streak += 1
        run.optimizer.zero_grad(set_to_none=True)
        if run.nonfinite_streak >= run.cfg.max_nonfinite_steps:
            raise TrainingError(f"the loss was not finite for {run.nonfinite_streak} steps in a row (last at step "
                                f"{run.step + 1}); lower the learning rate or check the data")
        return norm
    run.nonfinite_streak = 0
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return norm


def _account_skipped(run: Run, micro: list[dict]) -> None:
    """Record and report (rank 0) the step's skipped rows of every rank, and stop above max_bad_fraction: every
    rank sees the same rows, so all stop at the same step."""
    rows = all_gather_objects([(s.index, s.reason) for b in micro for s in b["skipped"]], run.info)
    for index, reason in rows:
        if index not in run.skipped:
            run.skipped[index] = reason
            if run.info.is_main:
                tqdm.write(f"skipped row {index}: {reason}")
    if len(run.skipped) > run.cfg.max_bad_fraction * len(run.dataset):
        rows = ", ".join(str(i) for i in list(run.skipped)[:10]) + (", ..." if len(run.skipped) > 10 else "")
        rows = f"row {rows}" if len(run.skipped) == 1 else f"rows {rows}"
        raise TrainingError(f"{len(run.skipped)} of {len(run.dataset)} rows were skipped ({rows}, each listed "
                            f"above with its reason), more than max_bad_fraction (--max-bad-fraction) "
                            f"{run.cfg.max_bad_fraction} allows; fix the data or raise the limit")


def save(run: Run, directory: Path) -> None:
    """A checkpoint at `directory` (collective: every rank gathers, rank 0 writes), its weights in the save dtype."""
    state = ckpt.full_model_state(run.module)
    training = ckpt.training_state(run.module, run.optimizer, run.scheduler, run.step)
    if not run.info.is_main:
        return
    training["weights"] = ckpt.rounded_weights(state, run.save_dtype, run.cfg.stage)
    state = {k.removeprefix("model."): v.to(run.save_dtype) if v.is_floating_point() else v for k, v in state.items()}
    model = ckpt.plain_model(run.model.cfg, state)
    if run.cfg.stage == "lora":
        with torch.random.fork_rng(devices=[]):  # adapter init draws random numbers: keep training's RNG as saved
            model = _with_lora_tensors(run, model, state)
    lora = dict(r=run.cfg.lora_r, alpha=run.cfg.lora_alpha, dropout=run.cfg.lora_dropout)
    ckpt.save_checkpoint(directory, lambda d: ckpt.write_model(d, model, run.cfg.stage, run.processor.tokenizer,
                                                               run.cfg.model, lora, run.extra_tensors),
                         training, run.cfg.save_total_limit)


def _with_lora_tensors(run: Run, model, state: dict[str, Any]):
    """A LoRA-shaped copy holding the gathered adapter tensors (so save_adapter can write them)."""
    apply_lora(model, r=run.cfg.lora_r, alpha=run.cfg.lora_alpha, dropout=run.cfg.lora_dropout)
    model.load_state_dict(state, assign=True)
    return model


def finish(run: Run) -> None:
    """The final model in output_dir, plus the loss curve."""
    save(run, run.output_dir / "final")
    if run.info.is_main:
        plot_loss_curve(run.logger.path, run.output_dir / "loss_curve.png")


def cleanup(run: Run) -> None:
    run.logger.close()
    dist_cleanup(run.info)
