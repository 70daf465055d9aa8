"""The original LLaVA train.py's, transformers' TrainingArguments' and PaddleMIX's options, mapped onto TrainConfig.

`translate` turns such options into TrainConfig's names and values, plus notes (one line each) for options that
mean something different here or nothing at all. Options it does not know pass through unchanged, so that
`config.normalize_options` can refuse the unknown ones by name. docs/training-compat.md is the same table in prose.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# What `python -m llavakit.train` (the stand-in for the original train.py) starts from: the defaults of the
# original's ModelArguments / DataArguments / TrainingArguments and of transformers' TrainingArguments where
# they differ from llavakit's own (which are those of LLaVA-1.5's scripts).
ORIGINAL_DEFAULTS: dict[str, Any] = {
    "mm_vision_select_layer": -1, "mm_projector_type": "linear", "model_max_length": 512, "lora_r": 64,
    "lora_alpha": 16, "image_aspect_ratio": "square", "learning_rate": 5e-5, "warmup_ratio": 0.0,
    "lr_scheduler_type": "linear", "num_train_epochs": 3.0, "per_device_train_batch_size": 8,
    "logging_steps": 500,
}

# Options accepted with no effect: name -> (type, why). A why of None: llavakit always behaves as the option asks
# (no note); otherwise the note is printed when the option is given.
IGNORED: dict[str, tuple[type, str | None]] = {
    "lazy_preprocess": (bool, None),  # rows are always read and tokenized when a batch needs them
    "is_multimodal": (bool, None),
    "remove_unused_columns": (bool, None),
    "do_train": (bool, None),
    "local_rank": (int, None),  # torchrun's LOCAL_RANK is read instead
    "lora_weight_path": (str, None),  # declared but never read by the original train.py
    "mpt_attn_impl": (str, "MPT backbones are not supported; the option is ignored"),
    "cache_dir": (str, "hub downloads go to huggingface_hub's cache (HF_HOME); cache_dir is ignored"),
    "disable_tqdm": (bool, None),
    "eval_accumulation_steps": (int, None),  # eval losses are summed as they come; nothing accumulates
    "logging_dir": (str, "TensorBoard logs go to OUTPUT_DIR/tensorboard; logging_dir is ignored"),
    "logging_strategy": (str, None),
    "logging_first_step": (bool, None),
    "dataloader_pin_memory": (bool, None),
    "ddp_find_unused_parameters": (bool, None),
    "ddp_timeout": (int, None),
    "ddp_backend": (str, None),  # NCCL on CUDA, gloo on CPU
    "save_safetensors": (bool, None),
    "save_only_model": (bool, None),
    "prediction_loss_only": (bool, None),
    "metric_for_best_model": (str, None),  # the best model is the one with the lowest eval loss
    "greater_is_better": (bool, None),
    "overwrite_cache": (bool, None),
    "push_to_hub": (bool, "llavakit does not push checkpoints to the hub; push_to_hub is ignored"),
    "log_level": (str, None),
    "mm_use_im_patch_token": (bool, None),  # checked in translate: True adds a token no prompt uses
    "image_grid_pinpoints": (str, "a LLaVA built from parts is LLaVA-1.5-style (no AnyRes); "
                                  "image_grid_pinpoints is ignored"),
    "mm_patch_merge_type": (str, "a LLaVA built from parts merges features flat (LLaVA-1.5); "
                                 "mm_patch_merge_type is ignored"),
    "quant_type": (str, None),  # checked in translate
    "double_quant": (bool, None),
    "optim": (str, None),  # checked in translate
    "fsdp_config": (str, "llavakit's FSDP wraps each decoder and vision layer; fsdp_config is ignored"),
    # PaddleMIX / PaddleNLP only.
    "mixtoken": (bool, "mixtoken (PaddleMIX's token mixing across rows) is Paddle-only; ignored"),
    "fp16_opt_level": (str, "fp16_opt_level is Paddle's AMP level; llavakit's --fp16/--bf16 autocast is O1"),
    "eval_with_do_generation": (bool, "evaluation reports the eval loss; eval_with_do_generation is ignored"),
    "skip_memory_metrics": (bool, None),
    "benchmark": (bool, None),
    "tensor_parallel_degree": (int, "tensor_parallel_degree is Paddle's hybrid parallelism; llavakit trains "
                                    "with DDP/FSDP under torchrun"),
    "pipeline_parallel_degree": (int, "pipeline_parallel_degree is Paddle's hybrid parallelism; ignored"),
    "sharding_parallel_degree": (int, "sharding_parallel_degree is Paddle's; use --fsdp under torchrun"),
    "sharding": (str, "sharding is Paddle's; use --fsdp under torchrun"),
    "amp_master_grad": (bool, None),
}

# Options translate() turns into TrainConfig options: name -> type (for the CLI's flags).
TRANSLATED: dict[str, type] = {
    "tune_mm_mlp_adapter": bool, "lora_enable": bool, "lora": bool, "bits": int,
    "fsdp": str, "fsdp_transformer_layer_cls_to_wrap": str, "deepspeed": str, "lora_rank": int, "max_length": int,
    "recompute": bool, "do_eval": bool, "lora_bias": str, "dataset": str,
}
WRAPPED_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer")
PADDLE_PREFIX = "llama."  # PaddleMIX's LLaVA names its decoder `llama`; llavakit's is `language_model`


def compat_flag_types() -> dict[str, type]:
    """Every option `translate` knows that is not a TrainConfig field, with its type (for argparse)."""
    return {**{k: t for k, (t, _) in IGNORED.items()}, **TRANSLATED}


def translate(raw: dict[str, Any], fields: set[str]) -> tuple[dict[str, Any], list[str]]:
    """(options under TrainConfig's names, notes) from options in llavakit's, the original LLaVA's, transformers'
    or PaddleMIX's names (either spelling). Unknown names pass through for normalize_options to refuse."""
    raw = {k.replace("-", "_"): v for k, v in raw.items()}
    out, notes = {}, []
    _stage(raw, out)
    for key, value in raw.items():
        if key in fields:
            out.setdefault(key, value)
        elif key in IGNORED:
            why = IGNORED[key][1]
            if why:
                notes.append(why)
        elif key not in TRANSLATED:
            out[key] = value  # unknown: normalize_options names it
    _precision_and_memory(raw, out, notes)
    _distributed(raw, out, notes)
    _paddle(raw, out, notes)
    _lora(raw, out, notes)
    if raw.get("mm_use_im_patch_token") and _truthy(raw["mm_use_im_patch_token"]):
        notes.append("mm_use_im_patch_token: the original adds an <im_patch> token no prompt uses; llavakit does not")
    if raw.get("optim", "adamw_torch") not in ("adamw_torch", "adamw_torch_fused", "adamw_hf"):
        notes.append(f"optim {raw['optim']!r}: llavakit trains with torch's AdamW")
    return out, notes


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _stage(raw: dict[str, Any], out: dict[str, Any]) -> None:
    """The stage the original's flags imply: tune_mm_mlp_adapter -> pretrain (projector only), lora_enable (or
    PaddleMIX's lora) -> lora, else the default (finetune); an explicit stage must agree."""
    implied = [stage for key, stage in (("tune_mm_mlp_adapter", "pretrain"), ("lora_enable", "lora"), ("lora", "lora"))
               if _truthy(raw.get(key, False))]
    if len(set(implied)) > 1:
        raise ValueError("tune_mm_mlp_adapter and lora_enable cannot both be true: the first trains only the "
                         "projector, the second LoRA adapters; choose one")
    if implied:
        if raw.get("stage", implied[0]) != implied[0]:
            raise ValueError(f"stage {raw['stage']!r} contradicts the original's flags, which imply "
                             f"{implied[0]!r}; drop one")
        out["stage"] = implied[0]


def _precision_and_memory(raw: dict[str, Any], out: dict[str, Any], notes: list[str]) -> None:
    if "max_length" in raw:
        out.setdefault("model_max_length", raw["max_length"])
    if "recompute" in raw:
        out.setdefault("gradient_checkpointing", _truthy(raw["recompute"]))
    bits = int(raw.get("bits", 16))
    if bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, got {bits}")
    method = out.get("quantization") or {4: "w4a16", 8: "w8a16"}.get(bits)
    if method:
        out["quantization"] = method
        if "quant_type" in raw or "double_quant" in raw:
            notes.append(f"bits {bits}: the base is quantized by llavakit ({method}, round-to-nearest int{bits} "
                         "weights), not bitsandbytes; quant_type and double_quant are ignored")


def _distributed(raw: dict[str, Any], out: dict[str, Any], notes: list[str]) -> None:
    """--fsdp "full_shard auto_wrap" and --deepspeed zeroN.json -> FSDP settings."""
    fsdp = raw.get("fsdp") or ""
    words = set((" ".join(fsdp) if isinstance(fsdp, list) else str(fsdp)).replace(",", " ").split())
    if words & {"full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2"}:
        out["distributed"] = "fsdp"
        out["fsdp_sharding"] = "shard_grad_op" if words & {"shard_grad_op", "hybrid_shard_zero2"} else "full_shard"
        out["cpu_offload"] = "offload" in words
        if words & {"hybrid_shard", "hybrid_shard_zero2"}:
            notes.append("fsdp hybrid_shard: llavakit shards across all processes (full_shard / shard_grad_op)")
    elif "no_shard" in words:
        out["distributed"] = "ddp"
    layer = raw.get("fsdp_transformer_layer_cls_to_wrap")
    if layer and str(layer).strip("'\"") not in WRAPPED_LAYERS:
        notes.append(f"fsdp_transformer_layer_cls_to_wrap {layer!r}: llavakit's FSDP wraps each decoder layer "
                     "and each vision layer, whatever this names")
    if raw.get("deepspeed"):
        stage, offload = _deepspeed_stage(str(raw["deepspeed"]))
        sharding = "full_shard" if stage == 3 else "shard_grad_op"
        out.update(distributed="fsdp", fsdp_sharding=sharding, cpu_offload=offload)
        notes.append(f"--deepspeed {raw['deepspeed']}: ZeRO-{stage}{' with offload' if offload else ''} runs as "
                     f"torch FSDP {sharding}{' with CPU offload' if offload else ''} (DeepSpeed is not used)")


def _deepspeed_stage(path: str) -> tuple[int, bool]:
    """(ZeRO stage, offload) from a DeepSpeed config file, or from its name (zero2.json, zero3_offload.json)
    when the file is not there."""
    file = Path(path)
    if file.is_file():
        try:
            zero = json.loads(file.read_text()).get("zero_optimization") or {}
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise ValueError(f"--deepspeed {path} is not a DeepSpeed JSON config") from None
        offload = any((zero.get(k) or {}).get("device") == "cpu" for k in ("offload_optimizer", "offload_param"))
        stage = int(zero.get("stage", 0))
    else:
        name = file.name.lower()
        stage = 3 if "zero3" in name else 2 if "zero2" in name else 0
        offload = "offload" in name
    if stage not in (2, 3):
        raise ValueError(f"--deepspeed {path}: llavakit maps ZeRO-2 and ZeRO-3 configs to FSDP; this one is "
                         f"{'ZeRO-' + str(stage) if file.is_file() else 'not found and its name says no ZeRO stage'}"
                         "; pass zero2.json or zero3.json, or --fsdp \"full_shard auto_wrap\"")
    return stage, offload


def _paddle(raw: dict[str, Any], out: dict[str, Any], notes: list[str]) -> None:
    """PaddleMIX's `dataset` block and do_eval."""
    dataset = raw.get("dataset")
    if dataset is not None:
        if isinstance(dataset, str):
            dataset = json.loads(dataset)
        for split, key in (("train", "data_path"), ("eval", "eval_data_path")):
            files = [f for entry in dataset.get(split) or [] for f in _as_list(entry.get("data_files"))]
            if len(files) > 1:
                raise ValueError(f"dataset.{split} names {len(files)} data files; llavakit reads one per split: "
                                 "concatenate them into one JSON file")
            if files:
                out.setdefault(key, files[0])
            if any(entry.get("chat_template") for entry in dataset.get(split) or []):
                notes.append(f"dataset.{split}.chat_template: llavakit uses the checkpoint's conversation "
                             "template (or --version); PaddleMIX's chat_template file is ignored")
    if "do_eval" in raw and not _truthy(raw["do_eval"]):
        if out.get("evaluation_strategy", "no") != "no":
            notes.append(f"do_eval false: no evaluation, although evaluation_strategy is "
                         f"{out['evaluation_strategy']!r}")
        out["evaluation_strategy"] = "no"
        out["load_best_model_at_end"] = False
    if str(raw.get("device", "")).lower() == "gpu":
        out["device"] = "cuda"


def _as_list(value: Any) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _lora(raw: dict[str, Any], out: dict[str, Any], notes: list[str]) -> None:
    if "lora_rank" in raw:
        out.setdefault("lora_r", raw["lora_rank"])
    bias = raw.get("lora_bias", "none")
    if bias != "none":
        notes.append(f"lora_bias {bias!r}: the LLaMA/Mistral layers LoRA adapts have no biases; nothing more trains")
    targets = out.get("lora_target_modules")
    if isinstance(targets, list):  # PaddleMIX regexes name the decoder `llama.`; llavakit's is `language_model.`
        out["lora_target_modules"] = ["language_model." + t[len(PADDLE_PREFIX):] if t.startswith(PADDLE_PREFIX)
                                      else t for t in targets]
