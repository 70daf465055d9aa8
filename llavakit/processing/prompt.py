"""From a user's text, images and videos to the exact input ids the model receives.

Render the conversation template, preprocess the images and videos, tokenize, and expand every image
or video tag to the exact number of features that item will produce, so that sequence lengths are
known before the vision tower runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llavakit.config import LlavaConfig
from llavakit.processing.conversation import Template, add_image_tags, get_template, render
from llavakit.processing.image import load_image, num_image_tokens, preprocess
from llavakit.processing.media import FetchPolicy
from llavakit.processing.tokens import split_on_tags, tokenize_texts
from llavakit.processing.video import VideoError, VideoLimits, load_video

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
_REQUEST_KEYS = frozenset({"prompt", "messages", "prompt_token_ids", "images", "videos", "conv_mode"})


# Markers for tags typed in untrusted text (a client's): never split on, turned back into the tag's characters
# after splitting. NUL cannot be part of a tag, so a marker never overlaps a real tag, and someone who types a
# marker only ever gets the tag's characters as text.
_ESCAPED_TAGS = {IMAGE_TAG: "\x00llavakit:typed-image-tag\x00", VIDEO_TAG: "\x00llavakit:typed-video-tag\x00"}


def escape_tags(text: str) -> str:
    """Text whose "<image>" / "<video>" are read as characters, never as media slots (`encode_prompt`)."""
    for tag, marker in _ESCAPED_TAGS.items():
        text = text.replace(tag, marker)
    return text


def unescape_tags(text: str) -> str:
    for tag, marker in _ESCAPED_TAGS.items():
        text = text.replace(marker, tag)
    return text


@dataclass(slots=True)
class PreparedImage:
    """One image ready for the model: pixel values (tiles, C, S, S), original (h, w), feature count."""

    pixel_values: torch.Tensor
    size: tuple[int, int]
    num_tokens: int


@dataclass(slots=True)
class PreparedVideo:
    """One video ready for the model: its sampled frames' pixel values (frames, C, S, S), feature count."""

    pixel_values: torch.Tensor
    num_tokens: int

    @property
    def num_frames(self) -> int:
        return self.pixel_values.shape[0]

    @property
    def size(self) -> None:
        """No image size: what tells a video from an image to `LlavaForConditionalGeneration.encode_media`."""
        return None


Media = PreparedImage | PreparedVideo


def media_hash(item: Media) -> str:
    """Content hash of a preprocessed image (pixels and original size) or video (its sampled frames): equal
    hashes mean equal features, which the engine's prefix cache and feature cache rely on."""
    key = f"video {item.num_frames}" if isinstance(item, PreparedVideo) else str(item.size)
    h = hashlib.sha256(key.encode())
    h.update(item.pixel_values.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(slots=True)
class PromptInputs:
    """What one prompt feeds the model, built only by `PromptProcessor`: input ids with every placeholder run
    expanded, the images and videos in the order the prompt places them, where each one's run starts, and
    the stop string of the conversation template the text was rendered with (None for raw text)."""

    ids: list[int]
    media: list[Media]
    starts: list[int]
    stop: str | None = None

    @property
    def spans(self) -> list[tuple[int, int]]:
        """(start, length) of each item's placeholder run, in prompt order."""
        return [(start, item.num_tokens) for start, item in zip(self.starts, self.media, strict=True)]

    def hashes(self) -> list[str]:
        """Each item's `media_hash`, in prompt order (computed on each call: it reads every pixel)."""
        return [media_hash(item) for item in self.media]


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

    def __init__(self, cfg: LlavaConfig, tokenizer: Any, template: Template, policy: FetchPolicy | None = None,
                 video_limits: VideoLimits | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.template = template
        self.policy = policy
        self.video_limits = video_limits or VideoLimits()
        self._literal: dict[int, list[int]] | None = None  # placeholder id -> ids of its spelling as text
        if cfg.use_im_start_end:
            missing = [t for t in ("<im_start>", "<im_end>") if t not in tokenizer.get_vocab()]
            if missing:
                raise ValueError(f"config.json sets mm_use_im_start_end but the tokenizer lacks {missing}; "
                                 "use the tokenizer saved with this checkpoint")

    def prepare_images(self, images: Sequence[Any]) -> list[PreparedImage]:
        """Load (path, URL, bytes, PIL) and preprocess each image; an already prepared image passes through."""
        out = []
        for source in images:
            if not isinstance(source, PreparedImage):
                pixels, size = preprocess(load_image(source, self.policy), self.cfg.image)
                n = num_image_tokens(size, self.cfg.vision, self.cfg.image, self.cfg.vision_feature_select,
                                     self.cfg.patch_merge_type)
                source = PreparedImage(pixels, size, n)
            out.append(source)
        return out

    def prepare_videos(self, videos: Sequence[Any], num_frames: int | None = None) -> list[PreparedVideo]:
        """Load (path, URL, bytes, frame array or list of PIL frames), sample `num_frames` frames (default:
        the checkpoint's) and preprocess each video; an already prepared video passes through."""
        if videos and not self.cfg.supports_video:
            raise VideoError(f"this checkpoint ({self.cfg.model_type}) takes no videos; use a LLaVA-NeXT-Video "
                             "(llava_next_video) checkpoint, or pass frames as images")
        out = []
        for source in videos:
            if not isinstance(source, PreparedVideo):
                pixels = load_video(source, self.cfg.video, num_frames, self.policy, self.video_limits)
                source = PreparedVideo(pixels, pixels.shape[0] * self.cfg.tokens_per_frame)
            out.append(source)
        return out

    def template_for(self, conv_mode: str | None) -> Template:
        """The checkpoint's template, or the one `conv_mode` names ("raw": the checkpoint's)."""
        return self.template if conv_mode in (None, "raw") else get_template(conv_mode)

    def render_messages(self, messages: list[dict[str, str]], num_images: int, conv_mode: str | None = None,
                        num_videos: int = 0) -> str:
        """Template text of a conversation. Image and video tags are added ("<image>\\n" each, then
        "<video>\\n" each) to the first user turn for each kind no message already carries."""
        tagged = add_image_tags(messages, num_videos, VIDEO_TAG)
        return render(self.template_for(conv_mode), add_image_tags(tagged, num_images, IMAGE_TAG))

    def render_prompt(self, prompt: str, num_images: int, conv_mode: str | None = None, num_videos: int = 0) -> str:
        """`prompt` as the first user turn of the template, or verbatim when conv_mode is "raw"."""
        if conv_mode == "raw":
            return prompt
        return self.render_messages([{"role": "user", "content": prompt}], num_images, conv_mode, num_videos)

    # --- PromptInputs: the one way a prompt becomes model input (Pipeline, LLM, the server) ---------------

    def prompt_inputs(self, prompt: str, images: Sequence[Any] = (), videos: Sequence[Any] = (),
                      conv_mode: str | None = None) -> PromptInputs:
        """`prompt` as the first user turn of the template (verbatim with conv_mode "raw"), its images and
        videos (sources or prepared) each prepared once."""
        images, videos = self.prepare_images(images), self.prepare_videos(videos)
        text = self.render_prompt(prompt, len(images), conv_mode, len(videos))
        return self.encode_prompt(text, images, videos, None if conv_mode == "raw" else self._stop(conv_mode))

    def chat_inputs(self, messages: list[dict[str, str]], images: Sequence[Any] = (), videos: Sequence[Any] = (),
                    conv_mode: str | None = None) -> PromptInputs:
        """A conversation ({"role", "content"} dicts) rendered by the template, ready for its next answer."""
        images, videos = self.prepare_images(images), self.prepare_videos(videos)
        text = self.render_messages(messages, len(images), conv_mode, len(videos))
        return self.encode_prompt(text, images, videos, self._stop(conv_mode))

    def token_inputs(self, ids: list[int], images: Sequence[Any] = (), videos: Sequence[Any] = ()) -> PromptInputs:
        """Ids the caller already expanded (benchmarks, replays): each image's and video's placeholder run is
        found in `ids`, in order; no stop string."""
        images, videos = self.prepare_images(images), self.prepare_videos(videos)
        runs = sorted(_placeholder_runs(ids, self.cfg.image_token_id, images, "image")
                      + _placeholder_runs(ids, self.cfg.video_token_id, videos, "video"), key=lambda r: r[0])
        return PromptInputs(list(ids), [item for _, item in runs], [start for start, _ in runs])

    def request_inputs(self, request: str | dict[str, Any] | PromptInputs) -> PromptInputs:
        """A request in `llavakit.LLM.generate`'s forms: a prompt string, a PromptInputs (as it is), or a
        dict with exactly one of {"prompt": str} (the first user turn; "conv_mode": "raw" feeds it verbatim),
        {"messages": [...]} ({"role", "content"} dicts) or {"prompt_token_ids": [...]} (already expanded),
        and optional "images", "videos" (sources or prepared) and "conv_mode"."""
        if isinstance(request, PromptInputs):
            return request
        if isinstance(request, str):
            request = {"prompt": request}
        if not isinstance(request, dict):
            raise TypeError(f"a request is a prompt string, a dict or PromptInputs, not {type(request).__name__}")
        texts = [k for k in ("prompt", "messages", "prompt_token_ids") if k in request]
        if request.keys() - _REQUEST_KEYS or len(texts) != 1:
            raise ValueError("a request dict has exactly one of prompt, messages, prompt_token_ids, and optional "
                             f"images, videos, conv_mode; got {', '.join(sorted(request))}")
        images, videos = request.get("images") or (), request.get("videos") or ()
        if "prompt_token_ids" in request:
            return self.token_inputs(list(request["prompt_token_ids"]), images, videos)
        if "messages" in request:
            return self.chat_inputs(request["messages"], images, videos, request.get("conv_mode"))
        return self.prompt_inputs(request["prompt"], images, videos, request.get("conv_mode"))

    def tokenize(self, text: str, images: Sequence[PreparedImage], videos: Sequence[PreparedVideo] = ()) -> list[int]:
        """Input ids of rendered `text` with each image or video tag expanded to its item's feature count."""
        return self.encode_prompt(text, images, videos).ids

    def encode_prompt(self, text: str, images: Sequence[PreparedImage], videos: Sequence[PreparedVideo] = (),
                      stop: str | None = None) -> PromptInputs:
        """Rendered `text` -> input ids; the n-th image tag takes images[n], the n-th video tag videos[n].
        Tags escaped with `escape_tags` (text a client typed) are read as plain characters, and so is any
        text that would tokenize to a placeholder id: only the media given here get placeholders."""
        if self.cfg.use_im_start_end:  # the original wraps the tag in text, then tokenizes around it
            text = text.replace(IMAGE_TAG, f"<im_start>{IMAGE_TAG}<im_end>")
        texts, tags = split_on_tags(text, [IMAGE_TAG, VIDEO_TAG] if self.cfg.supports_video else [IMAGE_TAG])
        _check_tag_count(tags.count(IMAGE_TAG), len(images), IMAGE_TAG, "image")
        _check_tag_count(tags.count(VIDEO_TAG), len(videos), VIDEO_TAG, "video")
        chunks = [self._as_text(c) for c in tokenize_texts(self.tokenizer, [unescape_tags(t) for t in texts])]
        queues = {IMAGE_TAG: iter(images), VIDEO_TAG: iter(videos)}
        token_ids = {IMAGE_TAG: self.cfg.image_token_id, VIDEO_TAG: self.cfg.video_token_id}
        inputs = PromptInputs(list(chunks[0]), [], [], stop)
        for tag, chunk in zip(tags, chunks[1:], strict=True):
            item = next(queues[tag])
            inputs.starts.append(len(inputs.ids))
            inputs.media.append(item)
            inputs.ids += [token_ids[tag]] * item.num_tokens + chunk
        return inputs

    def _stop(self, conv_mode: str | None) -> str | None:
        return self.template_for(conv_mode).stop_str

    def _as_text(self, ids: list[int]) -> list[int]:
        """A chunk's ids with each placeholder id (text that spelled a placeholder token) replaced by the ids
        of its characters."""
        if self._literal is None:
            vocab_size = len(self.tokenizer)
            self._literal = {i: _text_ids(self.tokenizer, self.tokenizer.convert_ids_to_tokens(i))
                             for i in (self.cfg.image_token_id, self.cfg.video_token_id)
                             if i is not None and 0 <= i < vocab_size}
        if not any(i in self._literal for i in ids):
            return ids
        return [j for i in ids for j in self._literal.get(i, (i,))]


def _placeholder_runs(ids: list[int], token_id: int | None, items: list[Media], kind: str) -> list[tuple[int, Media]]:
    """(start, item) of each image (or each video) in ids that were expanded by the caller, in order."""
    runs, pos = [], 0
    for item in items:
        while pos < len(ids) and ids[pos] != token_id:
            pos += 1
        if ids[pos:pos + item.num_tokens] != [token_id] * item.num_tokens:
            raise ValueError(f"prompt_token_ids lack the {item.num_tokens} placeholders of {kind} {len(runs) + 1}")
        runs.append((pos, item))
        pos += item.num_tokens
    return runs


def _text_ids(tokenizer, text: str) -> list[int]:
    """Ids of `text` read as plain characters, as they continue a word: the tokenizer already keeps the
    spaces around a special token it splits on, so no word-start marker may be added here."""
    def ids(t: str) -> list[int]:
        return tokenizer(t, add_special_tokens=False, split_special_tokens=True).input_ids

    anchor = ids("x")
    joined = ids("x" + text)
    return joined[len(anchor):] if joined[:len(anchor)] == anchor else ids(text)


def _check_tag_count(tags: int, items: int, tag: str, kind: str) -> None:
    if tags != items:
        raise ValueError(f"the prompt has {tags} {tag} tags but {items} {kind}s were given; put one {tag} where "
                         f"each {kind} goes, or let the template place them")
