"""Client text, images and videos to prompt ids, such that typed text never becomes an image or video slot.

Only the server places media tags: one "<image>\\n" per image, then one "<video>\\n" per video, at the
start of the message that carries them, each kind in the order of its parts (for the first user turn that
is exactly where `PromptProcessor.render_messages` puts them, so requests get the same ids as the offline
engine). A client who types "<image>" or "<video>" gets those characters as text: the tag is swapped for a
marker before rendering, and after tokenization any image or video token id that the text produced is
replaced by the ids of its characters. A stray placeholder id would otherwise fail the count check inside
the model and with it every request batched alongside.

Every parse here takes time linear in the client's text (STYLE §15), and the routes run it on a worker thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from llavakit.processing.prompt import (
    IMAGE_TAG,
    VIDEO_TAG,
    PreparedImage,
    PreparedVideo,
    PromptProcessor,
)
from llavakit.processing.tokens import split_on_tags, tokenize_texts
from llavakit.serve.errors import bad_request
from llavakit.serve.protocol import ChatMessage, ImagePart, VideoPart

# Markers for tags the client typed; never split on. (NUL cannot be part of a tag, so a marker never
# overlaps a real tag, and a client who types a marker only ever gets the tag's characters as text.)
_TYPED_TAGS = {IMAGE_TAG: "\x00llavakit:typed-image-tag\x00", VIDEO_TAG: "\x00llavakit:typed-video-tag\x00"}
_URL_END = re.compile(r"[)\s]")  # what ends a markdown image's URL


def protect(text: str, param: str) -> str:
    """Client text, checked to be valid Unicode, with each typed image or video tag marked as plain text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{param} holds an unpaired surrogate code point; send valid Unicode text", param) from None
    for tag, marker in _TYPED_TAGS.items():
        text = text.replace(tag, marker)
    return text


def _unprotect(text: str) -> str:
    """Text between the server's tags, with the client's typed tags back as their characters."""
    for tag, marker in _TYPED_TAGS.items():
        text = text.replace(marker, tag)
    return text


@dataclass(slots=True)
class ChatInput:
    """A conversation ready to render: contents with the server's image and video tags, and the image
    and video URLs, each in prompt order."""

    messages: list[dict[str, str]]
    images: list[str]
    videos: list[str] = field(default_factory=list)


def chat_input(messages: list[ChatMessage]) -> ChatInput:
    """OpenAI messages -> {"role", "content"} dicts. Images go first in their message, in order, each as
    "<image>\\n"; then videos, in order, each as "<video>\\n" (the order `PromptProcessor.render_messages`
    uses); text parts follow, joined by newlines. Only user messages may carry images or videos."""
    out, images, videos = [], [], []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        parts = [message.content or ""] if not isinstance(message.content, list) else message.content
        texts = [p if isinstance(p, str) else p.text for p in parts if not isinstance(p, (ImagePart, VideoPart))]
        urls = [p.image_url.url for p in parts if isinstance(p, ImagePart)]
        clips = [p.video_url.url for p in parts if isinstance(p, VideoPart)]
        if (urls or clips) and role != "user":
            kind = "images" if urls else "videos"
            raise bad_request(f"messages[{i}] has role {role!r} and {kind}; only user messages may carry images "
                              "or videos", f"messages.{i}.content")
        content = "\n".join(protect(t, f"messages.{i}.content") for t in texts)
        out.append({"role": role, "content": f"{IMAGE_TAG}\n" * len(urls) + f"{VIDEO_TAG}\n" * len(clips) + content})
        images += urls
        videos += clips
    if out[-1]["role"] != "user":
        raise bad_request(f"the last message has role {out[-1]['role']!r}; end the conversation with a user "
                          "message for the model to answer", "messages")
    return ChatInput(out, images, videos)


def raw_text(prompt: str, num_images: int, param: str) -> str:
    """A raw prompt (no template) with `num_images` image tags before it."""
    return f"{IMAGE_TAG}\n" * num_images + protect(prompt, param)


def markdown_images(inputs: str, param: str) -> tuple[str, list[str]]:
    """TGI inputs: each ![alt](url) (alt without "]", url not empty, without ")" or space) becomes an image tag
    where it stands; the rest is text. The images `!\\[[^\\]]*\\]\\(([^)\\s]+)\\)` finds, found in linear time: that
    regex rescans all that follows each "![" ("![](" * 20000 took seconds); here the next "]" and the next URL
    end are searched for once and kept while they lie ahead."""
    texts, urls, start, pos = [], [], 0, 0
    close = url_end = -1  # the last "]" and URL end found (-1: none searched for yet; len: none left)
    while (pos := inputs.find("![", pos)) != -1:
        if close < pos + 2:
            close = inputs.find("]", pos + 2) % (len(inputs) + 1)  # -1 -> len: no "]" left, no image left
        if close == len(inputs):
            break
        if inputs.startswith("(", close + 1):
            if url_end < close + 2:
                found = _URL_END.search(inputs, close + 2)
                url_end = found.start() if found else len(inputs)
            if url_end > close + 2 and inputs.startswith(")", url_end):
                texts.append(inputs[start:pos])
                urls.append(inputs[close + 2:url_end])
                start = pos = url_end + 1
                continue
        pos += 2
    texts.append(inputs[start:])
    return IMAGE_TAG.join(protect(t, param) for t in texts), urls


class PromptEncoder:
    """Tokenizes rendered text for one checkpoint by the chunk rule of `processing.tokens` (the text
    between image and video tags tokenized chunk by chunk), with typed tags read as plain text."""

    def __init__(self, processor: PromptProcessor):
        self.processor = processor
        cfg, tok = processor.cfg, processor.tokenizer
        vocab_size = len(tok)
        placeholders = {cfg.image_token_id, cfg.video_token_id}
        self._literal = {i: _text_ids(tok, tok.convert_ids_to_tokens(i))
                         for i in placeholders if i is not None and 0 <= i < vocab_size}
        # No token spans more characters than the longest vocabulary entry, so a text longer than
        # max_len * this many characters is over any token limit without tokenizing it.
        self.max_token_chars = max(len(t) for t in tok.get_vocab())

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        try:
            return self.processor.render_messages(messages, 0)
        except ValueError as e:  # turn order and roles, in the template's words
            raise bad_request(str(e), "messages") from None

    def encode(self, text: str, images: list[PreparedImage], videos: list[PreparedVideo] = ()) -> list[int]:
        """Ids of rendered `text` whose n-th image tag takes images[n]'s feature count of image placeholders
        and n-th video tag videos[n]'s of video placeholders."""
        cfg = self.processor.cfg
        if cfg.use_im_start_end:
            text = text.replace(IMAGE_TAG, f"<im_start>{IMAGE_TAG}<im_end>")
        texts, tags = split_on_tags(text, (IMAGE_TAG, VIDEO_TAG))
        assert tags.count(IMAGE_TAG) == len(images), f"{tags.count(IMAGE_TAG)} image tags for {len(images)} images"
        assert tags.count(VIDEO_TAG) == len(videos), f"{tags.count(VIDEO_TAG)} video tags for {len(videos)} videos"
        assert not videos or cfg.supports_video, "videos for a checkpoint that takes none"
        pieces = [_unprotect(piece) for piece in texts]
        chunks = [self._as_text(chunk) for chunk in tokenize_texts(self.processor.tokenizer, pieces)]
        queues = {IMAGE_TAG: (iter(images), cfg.image_token_id), VIDEO_TAG: (iter(videos), cfg.video_token_id)}
        ids = list(chunks[0])
        for tag, chunk in zip(tags, chunks[1:]):
            items, token_id = queues[tag]
            ids += [token_id] * next(items).num_tokens + chunk
        assert ids.count(cfg.image_token_id) == sum(im.num_tokens for im in images), "stray image placeholder"
        if cfg.video_token_id is not None:
            assert ids.count(cfg.video_token_id) == sum(v.num_tokens for v in videos), "stray video placeholder"
        return ids

    def _as_text(self, ids: list[int]) -> list[int]:
        """A chunk's ids with each placeholder id (a typed tag) replaced by the ids of its characters."""
        if not any(i in self._literal for i in ids):
            return ids
        return [j for i in ids for j in self._literal.get(i, (i,))]


def _text_ids(tokenizer, text: str) -> list[int]:
    """Ids of `text` read as plain characters, as they continue a word: the tokenizer already keeps the
    spaces around a special token it splits on, so no word-start marker may be added here."""
    def ids(t: str) -> list[int]:
        return tokenizer(t, add_special_tokens=False, split_special_tokens=True).input_ids

    anchor = ids("x")
    joined = ids("x" + text)
    return joined[len(anchor):] if joined[:len(anchor)] == anchor else ids(text)
