"""From a user's text, images and videos to the exact input ids the model receives.

Render the conversation template, preprocess the images and videos, tokenize, and expand every image
or video tag to the exact number of features that item will produce, so that sequence lengths are
known before the vision tower runs.
"""

from __future__ import annotations

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


Media = PreparedImage | PreparedVideo


@dataclass(slots=True)
class PromptInputs:
    """Input ids with every placeholder run expanded, the images and videos in the order the prompt places
    them, and where each one's run starts."""

    ids: list[int]
    media: list[Media]
    starts: list[int]

    @property
    def spans(self) -> list[tuple[int, int]]:
        """(start, length) of each item's placeholder run, in prompt order."""
        return [(start, item.num_tokens) for start, item in zip(self.starts, self.media)]


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

    def prepare_videos(self, videos: list[Any], num_frames: int | None = None) -> list[PreparedVideo]:
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
        """The checkpoint's template, or the one `conv_mode` names."""
        return self.template if conv_mode is None else get_template(conv_mode)

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

    def tokenize(self, text: str, images: list[PreparedImage], videos: list[PreparedVideo] = ()) -> list[int]:
        """Input ids of rendered `text` with each image or video tag expanded to its item's feature count."""
        return self.encode_prompt(text, images, videos).ids

    def tokenize_with_spans(self, text: str, images: list[PreparedImage],
                            videos: list[PreparedVideo] = ()) -> tuple[list[int], list[tuple[int, int]]]:
        """Input ids, and (start, length) of each image's or video's placeholder run, in prompt order."""
        inputs = self.encode_prompt(text, images, videos)
        return inputs.ids, inputs.spans

    def encode_prompt(self, text: str, images: list[PreparedImage], videos: list[PreparedVideo] = ()) -> PromptInputs:
        """Rendered `text` -> input ids; the n-th image tag takes images[n], the n-th video tag videos[n]."""
        if self.cfg.use_im_start_end:  # the original wraps the tag in text, then tokenizes around it
            text = text.replace(IMAGE_TAG, f"<im_start>{IMAGE_TAG}<im_end>")
        texts, tags = split_on_tags(text, [IMAGE_TAG, VIDEO_TAG] if self.cfg.supports_video else [IMAGE_TAG])
        _check_tag_count(tags.count(IMAGE_TAG), len(images), IMAGE_TAG, "image")
        _check_tag_count(tags.count(VIDEO_TAG), len(videos), VIDEO_TAG, "video")
        chunks = tokenize_texts(self.tokenizer, texts)
        queues = {IMAGE_TAG: iter(images), VIDEO_TAG: iter(videos)}
        token_ids = {IMAGE_TAG: self.cfg.image_token_id, VIDEO_TAG: self.cfg.video_token_id}
        inputs = PromptInputs(list(chunks[0]), [], [])
        for tag, chunk in zip(tags, chunks[1:]):
            item = next(queues[tag])
            inputs.starts.append(len(inputs.ids))
            inputs.media.append(item)
            inputs.ids += [token_ids[tag]] * item.num_tokens + chunk
        return inputs


def _check_tag_count(tags: int, items: int, tag: str, kind: str) -> None:
    if tags != items:
        raise ValueError(f"the prompt has {tags} {tag} tags but {items} {kind}s were given; put one {tag} where "
                         f"each {kind} goes, or let the template place them")
