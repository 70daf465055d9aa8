"""The training recipe, top to bottom: `setup(cfg)`, `train_loop(run)`, `cleanup(run)`.

One global batch = per_device_train_batch_size x world size x gradient_accumulation_steps samples. The
loss is the sum of token losses over the whole global batch divided by its number of supervised
tokens, so one process and N processes with the same global batch compute the same loss.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
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
from llavakit.train.adapter import MM_PROJECTOR_FILE, mm_projector_state, save_mm_projector
from llavakit.train.build import build_model, is_text_llm, param_groups, set_trainable
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
from llavakit.train.evaluate import evaluate
from llavakit.train.lora import DEFAULT_TARGETS, apply_lora, load_adapter
from llavakit.train.metrics import TRAINER_STATE_FILE, TrainLogger, plot_loss_curve, read_trainer_state, trainer_state
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
    from_parts: bool
    eval_dataset: LlavaDataset | None = None
    scaler: torch.amp.GradScaler | None = None
    best: tuple[float, Path] | None = None  # (lowest eval loss, its checkpoint)
    started: float = field(default_factory=time.perf_counter)
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
    if cfg.tf32:  # TF32 matrix products on Ampere+ (the original's --tf32); CPUs have no TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    output_dir = Path(cfg.output_dir)
    records = load_records(cfg.data_path)  # read and checked before the model loads: bad data fails in seconds
    check_image_files(records, _image_folder(cfg), cfg.max_bad_fraction)
    eval_records = load_records(cfg.eval_data_path) if cfg.evaluation_strategy != "no" else None
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
    module = wrap(LossModule(model), cfg.distributed, info, cfg.fsdp_sharding, cfg.cpu_offload)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
    save_dtype = getattr(torch, cfg.save_dtype) if cfg.save_dtype else ckpt.weights_dtype(source)
    from_parts = is_text_llm(source)
    logger = TrainLogger(output_dir, info.is_main, cfg.reporters, dataclasses.asdict(cfg), cfg.run_name)
    run = Run(cfg, info, model, module, processor, dataset, batches, optimizer, scheduler, logger, output_dir,
              _extra_tensors(cfg, model, source, from_parts), save_dtype, steps_per_epoch, total, from_parts)
    if eval_records is not None:
        run.eval_dataset = _dataset(cfg, eval_records, processor, output_dir)
    # fp16 needs loss scaling: small gradients underflow in float16 (bf16 has float32's range and needs none).
    run.scaler = torch.amp.GradScaler(info.device.type) if cfg.fp16 else None
    if resume is not None:
        run.step = ckpt.restore_training_state(resume, module, optimizer, scheduler, run.scaler)
        _restore_log_history(run, resume)
    return run


def _restore_log_history(run: Run, resume: Path) -> None:
    state = read_trainer_state(resume)
    if state is not None:
        run.logger.history = [e for e in state["log_history"] if e.get("step", 0) <= run.step]
        best = state.get("best_model_checkpoint")
        if best and Path(best).is_dir():
            run.best = (state["best_metric"], Path(best))


def _model(cfg: TrainConfig, info: DistInfo, resume: Path | None):
    """The model for the stage, its weights from `resume` when resuming; trainable parts set."""
    weights_from = resume if resume is not None and cfg.stage != "lora" else None
    build_cfg = cfg if weights_from is None else dataclasses.replace(cfg, model=str(weights_from), stage="finetune")
    model, processor, source = build_model(build_cfg, info.device)
    if cfg.stage == "lora":
        if resume is not None:
            load_adapter(model, resume)  # adapter and projector
        else:
            apply_lora(model, **lora_options(cfg))
    set_trainable(model, cfg)
    model.language_model.checkpoint_layers = cfg.gradient_checkpointing
    return model.train(), processor, source


def lora_options(cfg: TrainConfig) -> dict[str, Any]:
    return dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                targets=tuple(cfg.lora_target_modules or DEFAULT_TARGETS))


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


def _extra_tensors(cfg: TrainConfig, model: LlavaForConditionalGeneration, source: Path, from_parts: bool) -> dict:
    """Tower tensors llavakit never built, carried into saved checkpoints so transformers finds them."""
    if cfg.stage == "lora":
        return {}
    if from_parts:
        clip = dataclasses.replace(model.cfg, layout="clip", vision_tower_dir=None)
        return unused_source_tensors(Path(cfg.vision_tower), clip)
    return unused_source_tensors(source, model.cfg)


def lr_lambda(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Learning-rate multiplier per step: linear warmup over warmup_steps (else warmup_ratio), then the schedule."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total)

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
                run.logger.log({"epoch": epoch, **dataclasses.asdict(info)}, _epoch(run))
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{info.lr:.2e}")
            _evaluate_and_save(run)
            for callback in callbacks:
                callback(info)
    if run.history and not any(s.tokens for s in run.history):
        raise TrainingError(f"no step had a row to learn from: all {len(run.skipped)} rows read were skipped (each "
                            "listed above with its reason); fix the data")


def _epoch(run: Run) -> float:
    return round(run.step / run.steps_per_epoch, 4)


def _due(run: Run, strategy: str, every: int) -> bool:
    """Whether a `steps` / `epoch` event falls on the step just finished."""
    return (strategy == "steps" and run.step % every == 0) or (
        strategy == "epoch" and run.step % run.steps_per_epoch == 0)


def _evaluate_and_save(run: Run) -> None:
    """Evaluate and write checkpoint-N when the strategies say so; with load_best_model_at_end a checkpoint is
    written at every evaluation (so the best one exists to become final/)."""
    cfg = run.cfg
    evaluated = run.eval_dataset is not None and _due(run, cfg.evaluation_strategy, cfg.eval_every)
    if evaluated:
        metrics = evaluate(run.module, run.eval_dataset, cfg.per_device_eval_batch_size, run.info,
                           run.info.enabled and cfg.distributed == "fsdp", _autocast(run))
        run.logger.log_eval(metrics, run.step, _epoch(run))
        if run.info.is_main:
            tqdm.write(f"step {run.step}: eval loss {metrics['eval_loss']:.4f}")
    if (evaluated and cfg.load_best_model_at_end) or _due(run, cfg.save_strategy, cfg.save_steps):
        directory = run.output_dir / f"checkpoint-{run.step}"
        if evaluated and cfg.load_best_model_at_end and (run.best is None or metrics["eval_loss"] < run.best[0]):
            run.best = (metrics["eval_loss"], directory)
        if run.step < run.total_steps or cfg.load_best_model_at_end:
            save(run, directory)


def _autocast(run: Run):
    dtype = torch.float16 if run.cfg.fp16 else torch.bfloat16
    return torch.autocast(run.info.device.type, dtype=dtype, enabled=run.cfg.bf16 or run.cfg.fp16)


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
    autocast = _autocast(run)
    for batch, any_rank_images in zip(micro, images, strict=True):
        if not batch["indices"] and not info.enabled:
            continue  # all its rows skipped; under torchrun the empty batch still runs: every rank takes part
        with autocast:
            ce, _ = run.module(batch["input_ids"].to(info.device), batch["labels"].to(info.device),
                               [p.to(info.device) for p in batch["pixel_values"]], batch["image_sizes"],
                               blank_image=fsdp and any_rank_images > 0)
        # DDP/FSDP average gradients over ranks: scale by world size so the global sum / tokens results.
        loss = ce * info.world_size / total_tokens
        (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
        loss_sum += float(ce.detach())
        seen += int((batch["input_ids"] != run.dataset.pad_id).sum())
    return all_reduce_sum(loss_sum, info) / total_tokens, total_tokens, all_reduce_sum(seen, info)


def _optimizer_step(run: Run, loss: float) -> float:
    params = [p for p in run.module.parameters() if p.requires_grad]
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.max_grad_norm)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if run.scaler is not None and math.isfinite(loss):
        # The scaler skips a step whose gradients overflowed and lowers the scale: expected, not a divergence.
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if math.isfinite(norm):
            run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.nonfinite_streak = 0
        return norm
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
    training = ckpt.training_state(run.module, run.optimizer, run.scheduler, run.step, run.scaler)
    if not run.info.is_main:
        return
    if run.cfg.stage == "lora":  # only adapters and projector are written: no save-dtype copy of the frozen base
        state = {k: v for k, v in state.items() if ckpt.lora_saved(k)}
    training["weights"] = ckpt.rounded_weights(state, run.save_dtype, run.cfg.stage)
    state = {k.removeprefix("model."): v.to(run.save_dtype) if v.is_floating_point() else v for k, v in state.items()}
    model = ckpt.plain_model(run.model.cfg, state)
    if run.cfg.stage == "lora":
        with torch.random.fork_rng(devices=[]):  # adapter init draws random numbers: keep training's RNG as saved
            model = _with_lora_tensors(run, model, state)
    lora = dict(r=run.cfg.lora_r, alpha=run.cfg.lora_alpha, dropout=run.cfg.lora_dropout)
    mm_projector = _mm_projector(run, state)

    def write(d: Path) -> None:
        ckpt.write_model(d, model, run.cfg.stage, run.processor.tokenizer, run.cfg.model, lora, run.extra_tensors,
                         directory)
        if mm_projector is not None:
            save_mm_projector(mm_projector, d / MM_PROJECTOR_FILE)
        ckpt.write_json(d / TRAINER_STATE_FILE, _trainer_state(run))
    ckpt.save_checkpoint(directory, write, training, run.cfg.save_total_limit,
                         protect=run.best[1] if run.best else None)


def _mm_projector(run: Run, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """A projector-only run's mm_projector.bin (original names), which --pretrain_mm_mlp_adapter reads."""
    if run.cfg.stage != "pretrain":
        return None
    return mm_projector_state(state, run.model.cfg.projector_type == "linear", run.cfg.mm_use_im_start_end)


def _trainer_state(run: Run) -> dict[str, Any]:
    cfg = run.cfg
    best = {"best_metric": run.best[0], "best_model_checkpoint": str(run.best[1])} if run.best else {}
    return trainer_state(run.logger.history, epoch=_epoch(run), global_step=run.step, max_steps=run.total_steps,
                         num_train_epochs=math.ceil(run.total_steps / run.steps_per_epoch),
                         logging_steps=cfg.logging_steps, eval_steps=cfg.eval_every, save_steps=cfg.save_steps,
                         train_batch_size=cfg.per_device_train_batch_size, **best)


def _with_lora_tensors(run: Run, model, state: dict[str, Any]):
    """A LoRA-shaped copy holding the gathered adapter and projector tensors (so save_adapter can write them); its
    frozen base stays on the meta device."""
    apply_lora(model, **lora_options(run.cfg))
    model.load_state_dict(state, strict=False, assign=True)
    return model


def finish(run: Run) -> None:
    """The final model in output_dir (with load_best_model_at_end: a copy of the best checkpoint), its
    trainer_state.json, a projector-only run's mm_projector.bin beside it, and the loss curve."""
    final = run.output_dir / "final"
    _summary(run)
    if run.best is None:
        save(run, final)
    elif run.info.is_main:
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(run.best[1], final)
        if run.cfg.stage != "lora":
            ckpt.repoint_tower(final, final)
        tqdm.write(f"final/ is {run.best[1].name}, the lowest eval loss ({run.best[0]:.4f})")
    if run.info.is_main:
        ckpt.write_json(run.output_dir / TRAINER_STATE_FILE, _trainer_state(run))
        if (final / MM_PROJECTOR_FILE).is_file():  # where the original's scripts look for it
            shutil.copyfile(final / MM_PROJECTOR_FILE, run.output_dir / MM_PROJECTOR_FILE)
        plot_loss_curve(run.logger.path, run.output_dir / "loss_curve.png", run.logger.eval_path)


def _summary(run: Run) -> None:
    """transformers' last log_history entry: the run's mean loss and speed."""
    losses = [s.loss for s in run.history if s.tokens]
    runtime = time.perf_counter() - run.started
    samples = len(run.history) * run.cfg.per_device_train_batch_size * run.info.world_size * \
        run.cfg.gradient_accumulation_steps
    run.logger.log_summary({"train_loss": sum(losses) / len(losses) if losses else math.nan,
                            "train_runtime": round(runtime, 4),
                            "train_samples_per_second": round(samples / runtime, 3),
                            "train_steps_per_second": round(len(run.history) / runtime, 3)}, run.step, _epoch(run))


def cleanup(run: Run) -> None:
    run.logger.close()
    dist_cleanup(run.info)
