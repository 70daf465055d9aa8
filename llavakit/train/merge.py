"""Merge a LoRA training result (adapter + fully trained projector) into its base checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from llavakit.config import load_json
from llavakit.pipeline import load_processor, resolve_dtype
from llavakit.train.lora import ADAPTER_CONFIG, load_adapter, merge_lora
from llavakit.weights.hub import resolve_model_dir
from llavakit.weights.loader import load_llava
from llavakit.weights.save import save_llava_hf, unused_source_tensors


def merge_lora_checkpoint(base: str | Path, lora_dir: Path, out: Path, dtype: str = "auto") -> Path:
    """Load base + adapter (+ non_lora_trainables, see load_adapter), merge in fp32, write `out` as llava-hf."""
    if not (Path(lora_dir) / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{lora_dir} has no {ADAPTER_CONFIG}; pass the directory `llavakit train --stage lora` "
                         "wrote (e.g. OUTPUT_DIR/final)")
    directory = resolve_model_dir(base)
    processor = load_processor(directory)
    model = load_llava(processor.cfg, directory, torch.float32, torch.device("cpu"))
    load_adapter(model, lora_dir)
    merge_lora(model)
    target = _target_dtype(directory, dtype)
    model.to(target)
    extra = unused_source_tensors(directory, processor.cfg)
    return save_llava_hf(model, out, tokenizer=processor.tokenizer, extra_tensors=extra)


def _target_dtype(directory: Path, dtype: str) -> torch.dtype:
    if dtype != "auto":
        return resolve_dtype(dtype, torch.device("cpu"))
    raw = load_json(directory / "config.json")
    name = raw.get("torch_dtype") or raw.get("dtype") or (raw.get("text_config") or {}).get("torch_dtype")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32)
