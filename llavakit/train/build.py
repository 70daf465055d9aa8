"""The model each training stage starts from, and what each stage trains.

The model is an existing LLaVA, or, when `model` is a text LLM (as in the original train.py, which always builds
from parts), a new LLaVA from it + a CLIP tower: `<image>` (and with mm_use_im_start_end `<im_start>`,
`<im_end>`) added to the tokenizer, the vocabulary padded to a multiple of 64 (new rows = the mean embedding), a
projector of mm_projector_type, fresh or read from pretrain_mm_mlp_adapter (an mm_projector.bin).

- pretrain (the original's tune_mm_mlp_adapter): only the projector trains (with mm_use_im_start_end also the
  input embeddings, as in the original).
- finetune: projector + LLM (+ vision tower with unfreeze_vision) train.
- lora: LoRA adapters on the LLM's Linear layers + the projector train.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from llavakit.checkpoint_config import check_crop_size
from llavakit.config import (
    ConfigError,
    ImageConfig,
    LlavaConfig,
    TextConfig,
    VisionConfig,
    load_json,
    with_image_aspect_ratio,
)
from llavakit.models.llava import LlavaForConditionalGeneration
from llavakit.pipeline import load_processor, load_tokenizer
from llavakit.processing.conversation import get_template
from llavakit.processing.prompt import PromptProcessor
from llavakit.quant.config import QuantConfig
from llavakit.train.adapter import IM_START_END, load_mm_projector
from llavakit.train.config import TrainConfig
from llavakit.weights.hub import resolve_model_dir
from llavakit.weights.loader import load_llava, load_parts


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[LlavaForConditionalGeneration, PromptProcessor, Path]:
    """(fp32 model, prompt processor, source directory) for the configured stage."""
    directory = resolve_model_dir(cfg.model)
    if is_text_llm(directory):
        return build_from_parts(directory, cfg, device)
    processor = load_processor(directory, vision_tower=cfg.vision_tower, conv_mode=cfg.template_name,
                               image_aspect_ratio=cfg.image_aspect_ratio)
    if processor.cfg.layout == "original":
        raise ConfigError("training starts from llava-hf checkpoints; convert this original-layout checkpoint "
                          "first (llavakit.weights.save.save_llava_hf) or train from its llava-hf version")
    _check_saveable(processor.cfg, cfg.image_aspect_ratio)  # (a crop size the tower cannot take: refused on load)
    model = load_llava(processor.cfg, directory, torch.float32, device, quantization=_quantization(cfg))
    return model, processor, directory


def is_text_llm(directory: Path) -> bool:
    """Whether `directory` holds a text LLM (LlamaForCausalLM, ...) rather than a LLaVA."""
    raw = load_json(directory / "config.json")
    return not ({"vision_config", "mm_vision_tower", "mm_hidden_size"} & set(raw)) and "llava" not in str(
        raw.get("model_type", "")) + str(raw.get("architectures", "")).lower()


def _quantization(cfg: TrainConfig):
    """The base model's weight quantization for QLoRA (None: float)."""
    return QuantConfig.parse(cfg.quantization)


def _check_saveable(model_cfg: LlavaConfig, aspect: str | None) -> None:
    """Refuse before training what could not be saved after it: training writes llava-hf checkpoints, whose
    LLaVA-NeXT processor always tiles, so a NeXT model cannot keep a pad or crop override."""
    if aspect is not None and model_cfg.model_type != "llava" and model_cfg.image.mode != "anyres":
        raise ConfigError(f"image_aspect_ratio {aspect!r} on a {model_cfg.model_type} checkpoint cannot be trained: "
                          "the llava-hf checkpoints training saves tie LLaVA-NeXT to anyres tiling; "
                          "leave image_aspect_ratio unset or use anyres")


def build_from_parts(llm_dir: Path, cfg: TrainConfig, device: torch.device):
    """A new LLaVA-1.5-style model: the LLM's decoder, the CLIP tower, a projector of mm_projector_type (fresh,
    or from pretrain_mm_mlp_adapter)."""
    if not cfg.vision_tower:
        raise ConfigError(f"{llm_dir} is a text LLM: building a LLaVA from it needs vision_tower (--vision-tower), "
                          "a CLIP checkpoint directory or hub id")
    clip_dir = resolve_model_dir(cfg.vision_tower)
    tokenizer = load_tokenizer(llm_dir)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    if cfg.mm_use_im_start_end:
        tokenizer.add_tokens(list(IM_START_END), special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    raw = load_json(llm_dir / "config.json")
    vocab = max(raw.get("vocab_size", 0), math.ceil(len(tokenizer) / 64) * 64)
    text = TextConfig.from_dict({**raw, "vocab_size": vocab})
    vision = VisionConfig.from_dict(load_json(clip_dir / "config.json"))
    preproc_file = clip_dir / "preprocessor_config.json"
    preproc = load_json(preproc_file) if preproc_file.is_file() else {}
    crop = preproc.get("crop_size") or vision.image_size  # {"height": 336, ...}, or 336 in older files (openai/clip-*)
    size = int(crop.get("height", vision.image_size) if isinstance(crop, dict) else crop)
    model_cfg = LlavaConfig(vision=vision, text=text, image=ImageConfig(mode="pad", size=size, crop_size=size),
                            model_type="llava", image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            name_or_path=str(llm_dir), vision_feature_layer=cfg.mm_vision_select_layer,
                            vision_feature_select="full" if cfg.mm_vision_select_feature == "cls_patch" else "default",
                            projector_type=cfg.mm_projector_type, use_im_start_end=cfg.mm_use_im_start_end,
                            vision_tower_name=cfg.vision_tower)
    check_crop_size(size, vision.image_size, preproc_file)
    model_cfg = with_image_aspect_ratio(model_cfg, cfg.image_aspect_ratio)  # a LLaVA-1.5 model: pad or crop
    old_vocab = raw.get("vocab_size", text.vocab_size)
    loaders = {"language_model.embed_tokens.weight": _grow_rows(old_vocab)}
    if not text.tie_word_embeddings:
        loaders["lm_head.weight"] = _grow_rows(old_vocab)
    model = load_parts(model_cfg, [(llm_dir, "text-llm"), (clip_dir, "clip")], torch.float32, device,
                       init_missing=("projector.",), loaders=loaders, quantization=_quantization(cfg))
    if cfg.pretrain_mm_mlp_adapter:
        ids = tokenizer.convert_tokens_to_ids(list(IM_START_END)) if cfg.mm_use_im_start_end else []
        load_mm_projector(model, Path(cfg.pretrain_mm_mlp_adapter), ids)
    template = get_template(cfg.template_name or "vicuna_v1")
    return model, PromptProcessor(model_cfg, tokenizer, template), llm_dir


def _grow_rows(old_rows: int):
    """A weight loader that pads an embedding/LM head to the new vocabulary with the mean row."""
    def load(param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.shape[0] != old_rows or tensor.shape[1:] != param.shape[1:]:
            raise ValueError(f"expected {old_rows} rows of width {param.shape[1]}, got {tuple(tensor.shape)}")
        extra = tensor.float().mean(0, keepdim=True).expand(param.shape[0] - old_rows, -1)
        return torch.cat([tensor.float(), extra]).to(tensor.dtype)
    return load


def trainable_prefixes(cfg: TrainConfig) -> tuple[str, ...]:
    """Parameter-name prefixes a stage trains (LoRA adds its adapters on top)."""
    if cfg.stage == "pretrain":  # the original also trains the input embeddings when it adds <im_start>/<im_end>
        return ("projector.",) + (("language_model.embed_tokens.",) if cfg.mm_use_im_start_end else ())
    prefixes = () if cfg.freeze_mm_mlp_adapter else ("projector.", "image_newline")
    if cfg.stage == "finetune":
        prefixes += ("lm_head.",) if cfg.freeze_backbone else ("language_model.", "lm_head.")
    if cfg.unfreeze_vision:
        prefixes += ("vision_tower.",)
    return prefixes


def set_trainable(model: nn.Module, cfg: TrainConfig) -> None:
    """requires_grad on exactly what the stage trains (LoRA adapters are set by apply_lora)."""
    prefixes = trainable_prefixes(cfg)
    for name, param in model.named_parameters():
        is_lora = ".lora_A" in name or ".lora_B" in name
        param.requires_grad_(is_lora or name.startswith(prefixes))


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: projector at mm_projector_lr, vision tower at mm_vision_tower_lr (as LLaVA-NeXT),
    everything else at learning_rate; no weight decay on biases, norms and 1-D tensors."""
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "projector" if name.startswith("projector.") else "vision" if name.startswith("vision_tower.") else ""
        groups.setdefault((part, param.ndim >= 2), []).append(param)
    rates = {"projector": cfg.mm_projector_lr, "vision": cfg.mm_vision_tower_lr}
    return [{"params": params, "lr": rates.get(part) or cfg.learning_rate,
             "weight_decay": cfg.weight_decay if decay else 0.0}
            for (part, decay), params in sorted(groups.items())]
