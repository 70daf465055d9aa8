"""TrainConfig: every training option, named as in the original LLaVA / transformers scripts.

A config comes from a YAML or JSON file, from flags, or both (flags win). Each option is a flag in
both spellings: `--learning-rate 2e-5` and `--learning_rate 2e-5`; booleans accept `--bf16`,
`--bf16 true` and `--bf16 false`. The original LLaVA train.py's, transformers' and PaddleMIX's own option
names are translated by `compat.py`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavakit.datafiles import read_text
from llavakit.train.compat import translate

STAGES = ("pretrain", "finetune", "lora")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
SAVE_DTYPES = ("float32", "float16", "bfloat16")
STRATEGIES = ("no", "steps", "epoch")
REPORTERS = ("tensorboard", "wandb")


@dataclass(slots=True)
class TrainConfig:
    """Options of `llavakit train`; see the README's training section for their meaning."""

    stage: str = "finetune"
    model: str = ""  # llava checkpoint (finetune, lora) or text LLM (pretrain); alias model_name_or_path
    vision_tower: str | None = None  # CLIP directory (pretrain; original checkpoints without a tower)
    data_path: str = ""
    image_folder: str | None = None
    output_dir: str = "output"
    # `llavakit train` refuses a non-empty output_dir unless this is set or the run resumes (the transformers
    # scripts' convention); the recipe itself never deletes anything in it.
    overwrite_output_dir: bool = False
    conv_mode: str | None = None  # template; pretrain defaults to plain; alias `version`
    image_aspect_ratio: str | None = None  # pad | crop (square) | anyres: override the checkpoint's processing
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    # Run each device batch as this many micro-batches of rows of similar length: the same rows and the
    # same gradient (the loss is summed over the step's tokens either way) with less padding.
    micro_batches_by_length: int = 1
    learning_rate: float = 2e-5
    mm_projector_lr: float | None = None
    mm_vision_tower_lr: float | None = None  # with unfreeze_vision: the tower's own learning rate
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    max_grad_norm: float = 1.0
    model_max_length: int = 2048
    bf16: bool = False
    gradient_checkpointing: bool = False
    unfreeze_vision: bool = False  # alias unfreeze_mm_vision_tower
    freeze_mm_mlp_adapter: bool = False  # the original's flag: the projector keeps its weights
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    save_steps: int = 500
    save_total_limit: int | None = None
    logging_steps: int = 1
    group_by_modality_length: bool = False
    dataloader_num_workers: int = 0
    seed: int = 42
    max_bad_fraction: float = 0.01  # skipped rows above this fraction stop training
    max_nonfinite_steps: int = 3  # this many non-finite losses in a row stop training
    resume_from_checkpoint: str | None = None  # a checkpoint directory, or "latest" in output_dir
    distributed: str = "auto"  # auto (DDP when launched by torchrun) | ddp | fsdp
    device: str = "auto"
    image_cache_dir: str | None = None  # where image URLs are cached (default output_dir/image_cache)
    save_dtype: str | None = None  # dtype of the saved weights: float32 | float16 | bfloat16 (default: --model's)
    # Building a LLaVA from a text LLM and a CLIP tower (the original's ModelArguments).
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"  # patch | cls_patch
    mm_projector_type: str = "mlp2x_gelu"  # linear | mlpNx_gelu
    pretrain_mm_mlp_adapter: str | None = None  # an mm_projector.bin a projector-only run wrote
    mm_use_im_start_end: bool = False  # <im_start>/<im_end> around image features (LLaVAR)
    freeze_backbone: bool = False  # the decoder stays as it is (the LM head and projector still train)
    lora_target_modules: list[str] | None = None  # layer names, or regexes over llavakit module names
    quantization: str | None = None  # w4a16 | w8a16: LoRA on a base quantized by llavakit.quant (QLoRA)
    warmup_steps: int = 0  # > 0: overrides warmup_ratio, as in transformers
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    fp16: bool = False
    tf32: bool = False
    fsdp_sharding: str = "full_shard"  # full_shard (ZeRO-3) | shard_grad_op (ZeRO-2)
    cpu_offload: bool = False  # FSDP parameters and gradients on the CPU (CUDA only)
    report_to: list[str] | None = None  # tensorboard, wandb, none; default: tensorboard when installed
    run_name: str | None = None
    save_strategy: str = "steps"
    eval_data_path: str | None = None
    evaluation_strategy: str = "no"
    eval_steps: int | None = None  # default: logging_steps, as in transformers
    per_device_eval_batch_size: int = 8
    load_best_model_at_end: bool = False

    def __post_init__(self):
        checks = [
            (self.stage in STAGES, f"stage must be one of {STAGES}, got {self.stage!r}"),
            (self.lr_scheduler_type in SCHEDULERS, f"lr_scheduler_type must be one of {SCHEDULERS}"),
            (self.distributed in ("auto", "ddp", "fsdp"), "distributed must be auto, ddp or fsdp"),
            (self.save_dtype in (None, *SAVE_DTYPES),
             f"save_dtype must be one of {SAVE_DTYPES}, got {self.save_dtype!r}"),
            (self.per_device_train_batch_size >= 1 and self.gradient_accumulation_steps >= 1,
             "per_device_train_batch_size and gradient_accumulation_steps must be >= 1"),
            (1 <= self.micro_batches_by_length <= self.per_device_train_batch_size,
             f"micro_batches_by_length must be between 1 and per_device_train_batch_size "
             f"({self.per_device_train_batch_size}), got {self.micro_batches_by_length}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.max_steps > 0 or self.num_train_epochs > 0, "set max_steps or num_train_epochs > 0"),
            (self.model_max_length > 0, "model_max_length must be positive"),
            (self.save_steps > 0, "save_steps must be positive"),
            (self.mm_vision_select_feature in ("patch", "cls_patch"),
             f"mm_vision_select_feature must be patch or cls_patch, got {self.mm_vision_select_feature!r}"),
            (self.fsdp_sharding in ("full_shard", "shard_grad_op"),
             "fsdp_sharding must be full_shard or shard_grad_op"),
            (not (self.fp16 and self.bf16), "fp16 and bf16 cannot both be set; choose one"),
            (self.quantization in (None, "w4a16", "w8a16"),
             f"quantization must be w4a16 or w8a16, got {self.quantization!r}"),
            (self.quantization is None or self.stage == "lora",
             "a quantized base (quantization / bits 4|8) trains only LoRA adapters: add --lora_enable True "
             "(or --stage lora)"),
            (self.save_strategy in STRATEGIES and self.evaluation_strategy in STRATEGIES,
             f"save_strategy and evaluation_strategy must be one of {STRATEGIES}"),
            (self.evaluation_strategy == "no" or self.eval_data_path,
             f"evaluation_strategy {self.evaluation_strategy!r} needs eval_data_path (--eval-data-path): the rows "
             "to compute the eval loss on"),
            (not self.load_best_model_at_end or self.evaluation_strategy != "no",
             "load_best_model_at_end needs evaluation (evaluation_strategy steps or epoch, and eval_data_path)"),
            (self.eval_steps is None or self.eval_steps > 0, "eval_steps must be positive"),
            (self.per_device_eval_batch_size >= 1, "per_device_eval_batch_size must be >= 1"),
            (set(self.report_to or ()) <= {*REPORTERS, "none"},
             f"report_to must name tensorboard, wandb or none, got {self.report_to}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if not self.model:
            raise ValueError("no model given: set model (--model) to a checkpoint directory or hub id")
        if not self.data_path:
            raise ValueError("no data given: set data_path (--data-path) to a LLaVA JSON/JSONL file")

    @property
    def template_name(self) -> str | None:
        return self.conv_mode or ("plain" if self.stage == "pretrain" else None)

    @property
    def reporters(self) -> list[str] | None:
        """The loggers asked for (None: TensorBoard when it is installed)."""
        return None if self.report_to is None else [r for r in self.report_to if r != "none"]

    @property
    def eval_every(self) -> int:
        return self.eval_steps or self.logging_steps


ALIASES = {"model_name_or_path": "model", "version": "conv_mode", "unfreeze_mm_vision_tower": "unfreeze_vision",
           "per_device_batch_size": "per_device_train_batch_size", "lr": "learning_rate",
           "eval_strategy": "evaluation_strategy"}
_VERSION_TO_TEMPLATE = {"v1": "vicuna_v1", "v0": "llava_v0", "llava_llama_2": "llava_llama_2"}


def option_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def normalize_options(raw: dict[str, Any]) -> dict[str, Any]:
    """Keys in either spelling and the original's aliases -> TrainConfig field names."""
    fields = option_fields()
    out = {}
    for key, value in raw.items():
        name = ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        if name not in fields:
            raise ValueError(f"unknown training option {key!r}; see `llavakit train --help` and "
                             "docs/training-compat.md")
        out[name] = value
    if out.get("conv_mode") in _VERSION_TO_TEMPLATE:
        out["conv_mode"] = _VERSION_TO_TEMPLATE[out["conv_mode"]]
    for name in ("report_to", "lora_target_modules"):  # a list, or one comma-separated string
        if isinstance(out.get(name), str):
            out[name] = [v.strip() for v in out[name].split(",") if v.strip()]
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML (.yaml/.yml) or JSON file."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"training config {path} does not exist")
    text = read_text(path, "a YAML or JSON mapping of training options")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml and json raise their own error types
        raise ValueError(f"{path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values")
    return data


def make_config(file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from an optional file plus overrides (flags); see `build_config` for the notes."""
    return build_config(file, overrides)[0]


def build_config(file: str | Path | None, overrides: dict[str, Any],
                 defaults: dict[str, Any] | None = None) -> tuple[TrainConfig, list[str]]:
    """(TrainConfig, notes): options from `file` (llavakit's, the original LLaVA's or PaddleMIX's keys), then
    `overrides` (flags; None values are unset), over `defaults`. Notes say what a translated option became."""
    from_file, notes = translate(read_config_file(file), option_fields()) if file else ({}, [])
    given, flag_notes = translate({k: v for k, v in overrides.items() if v is not None}, option_fields())
    options = {**normalize_options(defaults or {}), **normalize_options(from_file), **normalize_options(given)}
    return TrainConfig(**options), notes + flag_notes
