"""Checkpoints: written to a temporary directory and renamed, so a kill mid-save leaves the previous
checkpoint whole; resume restores model, optimizer, scheduler, RNG and data position.

A checkpoint directory holds a loadable model (llava-hf files; for LoRA the peft-format adapter plus
`non_lora_trainables.safetensors`) in the save dtype, and `trainer_state.pt` (optimizer, scheduler, RNG, step,
and the float32 value of every weight the save dtype rounds), read back with `weights_only=True`.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llavakit.models.llava import LlavaForConditionalGeneration
from llavakit.train.lora import NON_LORA_PREFIXES, save_adapter
from llavakit.weights.files import find_weight_files, load_bin
from llavakit.weights.save import check_hf_representable, save_llava_hf
from llavakit.weights.save_original import TOWER_DIR, save_original

STATE_FILE = "trainer_state.pt"
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def weights_dtype(directory: Path) -> torch.dtype:
    """The dtype most of a checkpoint's floating-point tensors are stored in (read from the safetensors headers):
    the dtype training saves in unless told otherwise. float32 when none is float32, float16 or bfloat16."""
    counts: Counter = Counter()
    for f in find_weight_files(directory):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as handle:
                counts.update(_SAFETENSORS_DTYPES.get(handle.get_slice(n).get_dtype())
                              for n in handle.keys())  # noqa: SIM118 (a safe_open handle is not iterable)
        else:
            counts.update(t.dtype for t in load_bin(f).values())
    found = {dtype: n for dtype, n in counts.items() if dtype in _SAFETENSORS_DTYPES.values()}
    return max(found, key=found.get) if found else torch.float32


def rounded_weights(state: dict[str, torch.Tensor], dtype: torch.dtype, stage: str) -> dict[str, torch.Tensor]:
    """The exact values of the weights that saving in `dtype` rounds and that resuming reads back from the
    checkpoint's model files (LoRA: adapter and projector; its base comes from the model it started from). Kept
    in trainer_state.pt, so a resumed run goes on from the weights the interrupted one had."""
    return {name: t for name, t in state.items() if (stage != "lora" or lora_saved(name)) and t.is_floating_point()
            and not torch.equal(t.to(dtype).to(t.dtype), t)}


def lora_saved(name: str) -> bool:
    """Whether a LoRA run's checkpoint holds the tensor `name` (a full_model_state name): adapters and what trains
    fully beside them, not the frozen base."""
    name = name.removeprefix("model.")
    return ".lora_" in name or name.startswith(NON_LORA_PREFIXES)


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, whole and on CPU (gathered from FSDP shards; empty on ranks other than 0)."""
    return get_model_state_dict(module, options=_FULL)


def plain_model(cfg, state: dict[str, torch.Tensor]) -> LlavaForConditionalGeneration:
    """A plain (unwrapped, unsharded) model holding `state`, for saving."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    # Gathered FSDP tensors can be views into padded buffers; safetensors wants tensors that own storage.
    state = {k: v if v.untyped_storage().nbytes() == v.nbytes else v.clone() for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.text.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    return model


def write_model(directory: Path, model: LlavaForConditionalGeneration, stage: str, tokenizer: Any,
                base: str, lora: dict, extra: dict[str, torch.Tensor], final: Path | None = None) -> None:
    """The model part of a checkpoint: llava-hf files (the original layout for what llava-hf cannot hold: a
    `linear` projector, <im_start>/<im_end>), or for LoRA the adapter + fully trained parts."""
    if stage == "lora":
        save_adapter(model, directory, base_model=base, **lora)  # adapter + projector (llava-hf names)
        tokenizer.save_pretrained(directory)
        return
    try:
        check_hf_representable(model.cfg)
    except ValueError:
        save_original(model, directory, tokenizer=tokenizer, extra_tensors=extra)
        repoint_tower(directory, final or directory)
    else:
        save_llava_hf(model, directory, tokenizer=tokenizer, extra_tensors=extra)


def repoint_tower(directory: Path, final: Path) -> None:
    """An original-layout config names a tower saved beside it by absolute path: make it the path the checkpoint
    will have (`final`) rather than where it was written (a temporary directory, or the checkpoint it was copied
    from)."""
    config = directory / "config.json"
    raw = json.loads(config.read_text())
    tower = directory / TOWER_DIR
    if tower.is_dir() and Path(raw.get("mm_vision_tower", "")).name == TOWER_DIR:
        raw["mm_vision_tower"] = str((final / TOWER_DIR).resolve())
        write_json(config, raw)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_checkpoint(directory: Path, write: callable, state: dict[str, Any], keep: int | None,
                    protect: Path | None = None) -> Path:
    """Write a checkpoint atomically: `write(tmp_dir)` then trainer state, then rename into place. `keep`: the
    newest checkpoint-N directories to keep, besides `protect` (the best one, under load_best_model_at_end)."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    torch.save(state, tmp / STATE_FILE)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    if keep:
        for old in sorted_checkpoints(directory.parent)[:-keep]:
            if old != protect:
                shutil.rmtree(old)
    return directory


def sorted_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoint-N directories, oldest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_resume(spec: str | None, output_dir: Path) -> Path | None:
    """The checkpoint to resume from: a directory, or "latest" (None when there is none yet)."""
    if not spec:
        return None
    if spec == "latest":
        found = sorted_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{path} is not a training checkpoint (no {STATE_FILE}); pass a checkpoint-N directory")
    return path


def training_state(module: nn.Module, optimizer, scheduler, step: int, scaler=None) -> dict[str, Any]:
    """Everything but the weights that resuming needs (collective under FSDP: call on every rank)."""
    return {"step": step, "scaler": scaler.state_dict() if scaler is not None else {},
            "optimizer": get_optimizer_state_dict(module, optimizer, options=_FULL),
            "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python_rng": random.getstate()}


def restore_training_state(path: Path, module: nn.Module, optimizer, scheduler, scaler=None) -> int:
    """Load the weights the save dtype rounded, optimizer, scheduler and RNG state; returns the step to continue
    from."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    if state.get("weights"):
        set_model_state_dict(module, state["weights"], options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(module, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(_as_python_rng(state["python_rng"]))
    return int(state["step"])


def _as_python_rng(state) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss
