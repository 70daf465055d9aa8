"""Checkpoint tensor names -> llavakit parameter names, one table per layout.

Each table is an ordered list of (checkpoint prefix, llavakit prefix); the first prefix that matches
wins, and a llavakit prefix of None drops the tensor. Our module names follow transformers' CLIP and
LLaMA inside each part, so prefixes are all that differ between layouts.
"""

from __future__ import annotations

import re

Rules = list[tuple[str, str | None]]

LLAVA_HF: Rules = [
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.linear_1.", "projector.0."),
    ("multi_modal_projector.linear_2.", "projector.2."),
    ("image_newline", "image_newline"),
]

TRANSFORMERS_5: Rules = [
    ("model.language_model.", "language_model."),
    ("lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.linear_1.", "projector.0."),
    ("model.multi_modal_projector.linear_2.", "projector.2."),
    ("model.image_newline", "image_newline"),
]

ORIGINAL: Rules = [
    ("model.mm_projector.weight", "projector.0.weight"),  # a `linear` projector has no index
    ("model.mm_projector.bias", "projector.0.bias"),
    ("model.mm_projector.", "projector."),
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
    ("model.image_newline", "image_newline"),
    ("model.", "language_model."),
    ("lm_head.", "lm_head."),
]

# A CLIP checkpoint (openai/clip-vit-*) supplying the tower of an original-layout LLaVA.
CLIP_TOWER: Rules = [
    ("vision_model.", "vision_tower."),
    ("text_model.", None),
    ("visual_projection.", None),
    ("text_projection.", None),
    ("logit_scale", None),
]

# A text-only LLaMA/Mistral checkpoint (LlamaForCausalLM) becoming the decoder of a new LLaVA.
TEXT_LLM: Rules = [
    ("model.", "language_model."),
    ("lm_head.", "lm_head."),
]

LAYOUTS = {"llava-hf": LLAVA_HF, "transformers-5": TRANSFORMERS_5, "original": ORIGINAL, "clip": CLIP_TOWER,
           "text-llm": TEXT_LLM}

# Tensors that checkpoints carry but llavakit computes or never runs.
IGNORED = re.compile(r"(\.rotary_emb\.inv_freq|position_ids|^vision_tower\.post_layernorm\.)")
_TOWER_LAYER = re.compile(r"^vision_tower\.encoder\.layers\.(\d+)\.")


def map_name(name: str, rules: Rules) -> str | None:
    """The llavakit name for a checkpoint tensor, None to drop it; KeyError when no rule matches."""
    for src, dst in rules:
        if name.startswith(src):
            return None if dst is None else dst + name[len(src):]
    raise KeyError(name)


def is_unused(target: str, built_tower_layers: int) -> bool:
    """Tensors the model does not need: computed buffers, the CLIP head, layers past the feature layer."""
    if IGNORED.search(target):
        return True
    m = _TOWER_LAYER.match(target)
    return m is not None and int(m.group(1)) >= built_tower_layers


def detect_layout(names: list[str], config_layout: str) -> str:
    """Which table fits: the config tells original from llava-hf; names tell transformers-5 apart."""
    if config_layout == "original":
        return "original"
    if any(n.startswith("model.language_model.") for n in names):
        return "transformers-5"
    return "llava-hf"
