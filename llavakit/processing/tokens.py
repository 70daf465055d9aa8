"""Prompt text to token ids with image slots, as the original LLaVA `tokenizer_image_token`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from llavakit.config import ORIGINAL_IMAGE_TOKEN_ID


def split_on_tags(prompt: str, tags: Sequence[str]) -> tuple[list[str], list[str]]:
    """The texts between media tags and the tags in prompt order: len(texts) == len(found) + 1.
    "A<image>B<video>" with tags ("<image>", "<video>") -> (["A", "B", ""], ["<image>", "<video>"])."""
    parts = re.split("(" + "|".join(re.escape(t) for t in tags) + ")", prompt)
    return parts[0::2], parts[1::2]


def tokenize_chunks(tokenizer: Any, prompt: str, image_token: str | Sequence[str] = "<image>") -> list[list[int]]:
    """Token ids of the text between image tags: len(result) == number of tags + 1.

    Chunk rule (the original's): split the prompt on the image token and tokenize every chunk on its
    own, each as a whole text (`add_special_tokens=True`, so each chunk gets the tokenizer's BOS and
    its sentencepiece dummy-prefix "▁"). Keep the first chunk whole; if it starts with BOS, drop the
    leading BOS of every later chunk. Because each chunk is a separate encode, a chunk that starts
    with "\\n" (the usual "<image>\\n...") begins with "▁" (29871) then "\\n" (13), and a chunk ending
    in a space ("USER: ") ends with "▁" (29871). transformers' processors, which tokenize the whole
    text with one added "<image>" token per feature, give the same ids. An empty chunk (image at
    either end, adjacent images) contributes no ids. `image_token` may be several tags (image and video).
    """
    tags = [image_token] if isinstance(image_token, str) else list(image_token)
    return tokenize_texts(tokenizer, split_on_tags(prompt, tags)[0])


def tokenize_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text between tags, by the chunk rule of `tokenize_chunks`."""
    chunks = [tokenizer(chunk, add_special_tokens=True).input_ids for chunk in texts]
    bos = tokenizer.bos_token_id
    strip = int(bos is not None and chunks[0][:1] == [bos])
    for chunk in chunks[1:]:
        assert chunk[:strip] == [bos] * strip, "the tokenizer adds BOS to every encode"
    return [chunks[0]] + [c[strip:] for c in chunks[1:]]


def tokenize_with_images(tokenizer: Any, prompt: str, image_token: str = "<image>",
                         placeholder_id: int = ORIGINAL_IMAGE_TOKEN_ID) -> list[int]:
    """Token ids of `prompt` with one `placeholder_id` wherever `image_token` stands, e.g.
    "... USER: <image>\\nWhat" -> [..., 3148, 1001, 29901, 29871, -200, 29871, 13, 5618, ...]."""
    chunks = tokenize_chunks(tokenizer, prompt, image_token)
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids.append(placeholder_id)
        ids.extend(chunk)
    return ids
