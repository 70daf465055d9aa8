"""Client text to the text the template renders, such that typed text never becomes an image or video slot;
`PromptProcessor.encode_prompt` then makes the request's PromptInputs, as it does for `LLM.generate`.

Only the server places media tags: one "<image>\\n" per image, then one "<video>\\n" per video, at the
start of the message that carries them, each kind in the order of its parts (for the first user turn that
is exactly where `PromptProcessor.render_messages` puts them, so requests get the same ids as the offline
engine). A client who types "<image>" or "<video>" gets those characters as text: the tag is escaped
(`processing.prompt.escape_tags`) before rendering, and processing reads it, and any text that would
tokenize to a placeholder id, as characters. A stray placeholder id would otherwise fail the count check
inside the model and with it every request batched alongside.

Every parse here takes time linear in the client's text (STYLE §15), and the routes run it on a worker thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from llavakit.processing.prompt import IMAGE_TAG, VIDEO_TAG, PromptProcessor, escape_tags
from llavakit.serve.errors import bad_request
from llavakit.serve.protocol import ChatMessage, ImagePart, VideoPart

_URL_END = re.compile(r"[)\s]")  # what ends a markdown image's URL


def protect(text: str, param: str) -> str:
    """Client text, checked to be valid Unicode, with each typed image or video tag marked as plain text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{param} holds an unpaired surrogate code point; send valid Unicode text", param) from None
    return escape_tags(text)


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


def render_chat(processor: PromptProcessor, messages: list[dict[str, str]]) -> str:
    """The template's text of a conversation whose tags the server placed (`chat_input`)."""
    try:
        return processor.render_messages(messages, 0)
    except ValueError as e:  # turn order and roles, in the template's words
        raise bad_request(str(e), "messages") from None
