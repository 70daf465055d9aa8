"""Tiny random LLaVA checkpoints in every published layout, built with transformers (the reference).

Each builder returns the checkpoint directory and the transformers model holding the same weights.
Dimensions are tiny so that a parity test runs in about a second on a CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from llavakit.assets import LLAMA_TOKENIZER_DIR

IMAGE_TOKEN_ID = 32000
VOCAB = 32064
TILE = 28  # vision image_size: a 2 x 2 patch grid at patch size 14
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]


def vision_config_dict(**over) -> dict:
    d = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, image_size=TILE, patch_size=14, projection_dim=16)
    d.update(over)
    return d


def text_config_dict(text_type: str = "llama", **over) -> dict:
    d = dict(model_type=text_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=512,
             rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=32001)
    if text_type == "mistral":
        d["sliding_window"] = None
    d.update(over)
    return d


def build_hf_model(model_type: str = "llava", text: dict | None = None, vision: dict | None = None,
                   seed: int = 0, **top):
    """A transformers Llava / LlavaNext / LlavaNextVideo model with random weights (fp32, eval mode)."""
    import transformers

    torch.manual_seed(seed)
    cfg_cls = {"llava": transformers.LlavaConfig, "llava_next": transformers.LlavaNextConfig,
               "llava_next_video": transformers.LlavaNextVideoConfig}[model_type]
    model_cls = {"llava": transformers.LlavaForConditionalGeneration,
                 "llava_next": transformers.LlavaNextForConditionalGeneration,
                 "llava_next_video": transformers.LlavaNextVideoForConditionalGeneration}[model_type]
    kwargs = {"text_config": text or text_config_dict(), "vision_config": vision or vision_config_dict(),
              "image_token_index": IMAGE_TOKEN_ID, **top}
    if model_type != "llava":
        kwargs.setdefault("image_grid_pinpoints", PINPOINTS)
    model = model_cls(cfg_cls(**kwargs)).eval()
    with torch.no_grad():  # random init leaves some tensors at zero/one; make every tensor count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def save_tokenizer(directory: Path, extra_tokens: tuple[str, ...] = ("<image>", "<pad>")) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(LLAMA_TOKENIZER_DIR)
    tok.add_tokens(list(extra_tokens), special_tokens=True)
    if "<pad>" in extra_tokens:
        tok.pad_token = "<pad>"
    tok.save_pretrained(directory)


def _hub_name(key: str) -> str:
    """transformers-5 in-memory names -> llava-hf hub names."""
    for src, dst in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.image_newline", "image_newline")):
        if key.startswith(src):
            return dst + key[len(src):]
    raise KeyError(key)


def write_hf_checkpoint(model, directory: Path, layout: str = "hub", processor: dict | None = None,
                        shards: int = 1, tokens: tuple[str, ...] = ("<image>", "<pad>")) -> Path:
    """Save `model` as llava-hf hub layout ("hub"), transformers-5 names ("transformers-5") or with
    transformers' own save_pretrained ("save_pretrained"). `tokens` are added to the LLaMA tokenizer in order
    (ids 32000, 32001, ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "save_pretrained":
        model.save_pretrained(directory)
    else:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.text_config.tie_word_embeddings:  # tied checkpoints store the embedding once
            state.pop("lm_head.weight")
        if layout == "hub":
            state = {_hub_name(k): v for k, v in state.items()}
        _save_state(state, directory, shards)
        model.config.save_pretrained(directory)
    save_tokenizer(directory, tokens)
    if processor is not None:
        (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    return directory


def _save_state(state: dict, directory: Path, shards: int) -> None:
    if shards == 1:
        save_file(state, directory / "model.safetensors")
        return
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, directory / name)
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def processor_config(kind: str, size: int = TILE, **over) -> dict:
    d = dict(image_processor_type=kind, size={"shortest_edge": size}, crop_size={"height": size, "width": size},
             image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
             do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True, do_convert_rgb=True,
             resample=3, rescale_factor=1 / 255)
    d.update(over)
    return d


def write_original_checkpoint(model, directory: Path, tower_dir: Path | None, *, projector: str = "mlp2x_gelu",
                              aspect: str = "pad", im_start_end: bool = False,
                              extra_config: dict | None = None) -> Path:
    """Original LLaVA layout (LlavaLlamaForCausalLM + mm_* keys); the CLIP tower goes to `tower_dir`
    as an openai/clip-style checkpoint, or stays inside when tower_dir is None (LLaVA-1.6 style)."""
    directory.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    state = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            state["model." + k[len("model.language_model."):]] = v
        elif k == "lm_head.weight":
            state[k] = v
        elif k.startswith("model.multi_modal_projector."):
            rest = k[len("model.multi_modal_projector."):]
            idx = {"linear_1": "0", "linear_2": "2"}[rest.split(".")[0]]
            if projector == "linear" and idx == "2":
                continue
            name = rest.split(".", 1)[1] if projector == "linear" else f"{idx}.{rest.split('.', 1)[1]}"
            state["model.mm_projector." + name] = v
        elif k == "model.image_newline":
            state["model.image_newline"] = v
        elif k.startswith("model.vision_tower.") and tower_dir is None:
            state["model.vision_tower.vision_tower.vision_model." + k[len("model.vision_tower."):]] = v
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors")
    text = model.config.text_config.to_dict()
    cfg = {k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                                "bos_token_id", "eos_token_id", "tie_word_embeddings")}
    cfg["rope_theta"] = text.get("rope_parameters", {}).get("rope_theta", 10000.0)
    arch = "LlavaMistralForCausalLM" if text["model_type"] == "mistral" else "LlavaLlamaForCausalLM"
    cfg.update(architectures=[arch], model_type="llava", mm_vision_tower="openai/clip-vit-tiny-test",
               mm_hidden_size=model.config.vision_config.hidden_size, mm_projector_type=projector,
               mm_vision_select_layer=model.config.vision_feature_layer, mm_vision_select_feature="patch",
               mm_use_im_start_end=im_start_end, mm_use_im_patch_token=False, image_aspect_ratio=aspect,
               mm_patch_merge_type="flat")
    cfg.update(extra_config or {})
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    if tower_dir is not None:
        write_clip_tower(model, tower_dir)
    return directory


def write_clip_tower(model, tower_dir: Path) -> None:
    """An openai/clip-vit-style directory: CLIPModel names (vision_model.*, text parts), config, processor."""
    tower_dir.mkdir(parents=True, exist_ok=True)
    state = {"vision_model." + k[len("model.vision_tower."):]: v.contiguous()
             for k, v in model.state_dict().items() if k.startswith("model.vision_tower.")}
    state["logit_scale"] = torch.tensor(2.6592)
    state["visual_projection.weight"] = torch.randn(16, model.config.vision_config.hidden_size)
    save_file(state, tower_dir / "model.safetensors")
    vision = model.config.vision_config.to_dict()
    (tower_dir / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": vision,
                                                       "text_config": {}, "projection_dim": 16}))
    (tower_dir / "preprocessor_config.json").write_text(json.dumps(processor_config("CLIPImageProcessor")))


def copy_tokenizer_with(directory: Path, tokens: tuple[str, ...]) -> None:
    save_tokenizer(directory, tokens)


__all__ = ["build_hf_model", "write_hf_checkpoint", "write_original_checkpoint", "processor_config",
           "save_tokenizer", "shutil"]
