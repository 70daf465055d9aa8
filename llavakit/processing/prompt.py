"""From a user's text and images to the exact input ids the model receives.

Render the conversation template, preprocess the images, tokenize, and expand every image tag to the
exact number of features that image will produce, so that sequence lengths are known before the
vision tower runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llavakit.config import LlavaConfig
from llavakit.processing.conversation import Template, add_image_tags, get_template, render
from llavakit.processing.image import load_image, num_image_tokens, preprocess
from llavakit.processing.media import FetchPolicy
from llavakit.processing.tokens import tokenize_chunks

IMAGE_TAG = "<image>"


@dataclass(slots=True)
class PreparedImage:
    """One image ready for the model: pixel values (tiles, C, S, S), original (h, w), feature count."""

    pixel_values: torch.Tensor
    size: tuple[int, int]
    num_tokens: int


def default_template_name(cfg: LlavaConfig, tokenizer: Any) -> str:
    """The conversation template a checkpoint was trained with, judged from its config and tokenizer
    files (never from the directory name)."""
    vocab = tokenizer.get_vocab()
    chat_template = str(getattr(tokenizer, "chat_template", "") or "")
    if "<|im_start|>" in vocab or "<|im_start|>" in chat_template:
        return "chatml_direct"
    if "<<SYS>>" in chat_template:
        return "llava_llama_2"
    if cfg.text.model_type == "mistral" or "[INST]" in chat_template:
        return "mistral_instruct"
    return "vicuna_v1"


class PromptProcessor:
    """Renders, tokenizes and expands prompts for one checkpoint."""

    def __init__(self, cfg: LlavaConfig, tokenizer: Any, template: Template, policy: FetchPolicy | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.template = template
        self.policy = policy
        if cfg.use_im_start_end:
            missing = [t for t in ("<im_start>", "<im_end>") if t not in tokenizer.get_vocab()]
            if missing:
                raise ValueError(f"config.json sets mm_use_im_start_end but the tokenizer lacks {missing}; "
                                 "use the tokenizer saved with this checkpoint")

    def prepare_images(self, images: list[Any]) -> list[PreparedImage]:
        """Load (path, URL, bytes, PIL) and preprocess each image."""
        out = []
        for source in images:
            pixels, size = preprocess(load_image(source, self.policy), self.cfg.image)
            n = num_image_tokens(size, self.cfg.vision, self.cfg.image, self.cfg.vision_feature_select,
                                 self.cfg.patch_merge_type)
            out.append(PreparedImage(pixels, size, n))
        return out

    def template_for(self, conv_mode: str | None) -> Template:
        """The checkpoint's template, or the one `conv_mode` names."""
        return self.template if conv_mode is None else get_template(conv_mode)

    def render_messages(self, messages: list[dict[str, str]], num_images: int, conv_mode: str | None = None) -> str:
        """Template text of a conversation, with image tags added to the first user turn if absent."""
        return render(self.template_for(conv_mode), add_image_tags(messages, num_images, IMAGE_TAG))

    def render_prompt(self, prompt: str, num_images: int, conv_mode: str | None = None) -> str:
        """`prompt` as the first user turn of the template, or verbatim when conv_mode is "raw"."""
        if conv_mode == "raw":
            return prompt
        return self.render_messages([{"role": "user", "content": prompt}], num_images, conv_mode)

    def tokenize(self, text: str, images: list[PreparedImage]) -> list[int]:
        """Input ids of rendered `text` with each image tag expanded to its image's feature count."""
        return self.tokenize_with_spans(text, images)[0]

    def tokenize_with_spans(self, text: str, images: list[PreparedImage]) -> tuple[list[int], list[tuple[int, int]]]:
        """Input ids, and (start, length) of each image's placeholder run in them."""
        if self.cfg.use_im_start_end:  # the original wraps the tag in text, then tokenizes around it
            text = text.replace(IMAGE_TAG, f"<im_start>{IMAGE_TAG}<im_end>")
        chunks = tokenize_chunks(self.tokenizer, text, IMAGE_TAG)
        if len(chunks) - 1 != len(images):
            raise ValueError(f"the prompt has {len(chunks) - 1} {IMAGE_TAG} tags but {len(images)} images were "
                             f"given; put one {IMAGE_TAG} where each image goes, or let the template place them")
        ids = list(chunks[0])
        spans = []
        for image, chunk in zip(images, chunks[1:]):
            spans.append((len(ids), image.num_tokens))
            ids += [self.cfg.image_token_id] * image.num_tokens + chunk
        return ids, spans
