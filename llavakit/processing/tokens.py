"""Prompt text to the token ids between media tags, as the original LLaVA's `tokenizer_image_token`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any


def split_on_tags(prompt: str, tags: Sequence[str]) -> tuple[list[str], list[str]]:
    """The texts between media tags and the tags in prompt order: len(texts) == len(found) + 1.
    "A<image>B<video>" with tags ("<image>", "<video>") -> (["A", "B", ""], ["<image>", "<video>"])."""
    parts = re.split("(" + "|".join(re.escape(t) for t in tags) + ")", prompt)
    return parts[0::2], parts[1::2]


def tokenize_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text between media tags (`split_on_tags`), by the original LLaVA's chunk rule
    (`tokenizer_image_token`): tokenize every chunk on its own, each as a whole text (`add_special_tokens=True`,
    so each chunk gets the tokenizer's BOS and its sentencepiece dummy-prefix "▁"). Keep the first chunk whole;
    if it starts with BOS, drop the leading BOS of every later chunk. Because each chunk is a separate encode,
    a chunk that starts with "\\n" (the usual "<image>\\n...") begins with "▁" (29871) then "\\n" (13), and a
    chunk ending in a space ("USER: ") ends with "▁" (29871). transformers' processors, which tokenize the
    whole text with one added "<image>" token per feature, give the same ids. An empty chunk (image at either
    end, adjacent images) contributes no ids."""
    chunks = [tokenizer(chunk, add_special_tokens=True).input_ids for chunk in texts]
    bos = tokenizer.bos_token_id
    strip = int(bos is not None and chunks[0][:1] == [bos])
    for chunk in chunks[1:]:
        assert chunk[:strip] == [bos] * strip, "the tokenizer adds BOS to every encode"
    return [chunks[0]] + [c[strip:] for c in chunks[1:]]
