"""Videos from clients (LLaVA-NeXT-Video checkpoints): bytes through the one guarded fetcher
(processing/media.py: public addresses only, every redirect checked, file:// only under the allowed
directory) with the video byte cap, then decoded by processing/video.py under VideoLimits: the duration
and frame size the header declares are checked before any frame is decoded, and frames are counted as
they are decoded. Only the checkpoint's `num_frames` sampled frames are kept, as pixel values.

Runs on a worker thread, never on the event loop. Every failure is an APIError 400 with code
"invalid_video" whose message names the video by its position in the request and says what is wrong
(the URL is refused, the download fails or is too large, the bytes are not a video, it is too long, no
frame decodes); exception text of the decoder never reaches the client.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass

from llavakit.processing.media import FetchPolicy, MediaError
from llavakit.processing.prompt import PreparedVideo, PromptProcessor
from llavakit.processing.video import VideoError, VideoLimits, load_video
from llavakit.serve.errors import bad_request

log = logging.getLogger(__name__)

# The decoder's messages advise raising its limits ("or raise VideoLimits.max_duration_s"), which a client
# cannot do; they are reworded for a client. (The fetcher's MediaError has a message for clients already.)
_LIBRARY_ADVICE = re.compile(r" or raise [A-Z]\w*\.\w+")
_LIBRARY_ONLY_ADVICE = re.compile(r"; raise [A-Z]\w*\.\w+$")


@dataclass(slots=True)
class VideoSettings:
    """The fetch policy for videos (the server's, with the video byte cap) and the decoding limits."""

    policy: FetchPolicy
    limits: VideoLimits

    @classmethod
    def of(cls, fetch: FetchPolicy, max_bytes: int, max_seconds: float) -> VideoSettings:
        limits = VideoLimits(max_bytes=max_bytes, max_duration_s=max_seconds)  # other limits: VideoLimits'
        return cls(dataclasses.replace(fetch, max_bytes=max_bytes), limits)


def prepare_videos(sources: list[str], processor: PromptProcessor, settings: VideoSettings,
                   param: str = "messages") -> list[PreparedVideo]:
    """Fetch, check, decode and sample each video URL (http(s), data:, or file:// where allowed)."""
    return [_prepare_one(source, i + 1, processor, settings, param) for i, source in enumerate(sources)]


def _prepare_one(source: str, number: int, processor: PromptProcessor, settings: VideoSettings,
                 param: str) -> PreparedVideo:
    name = f"video {number}"
    cfg = processor.cfg
    try:
        pixels = load_video(source, cfg.video, None, settings.policy, settings.limits)
    except (MediaError, VideoError) as e:  # messages written for users: what is wrong, what to do
        raise bad_request(f"{name}: {_for_client(e)}", param, "invalid_video") from None
    except Exception:  # a decoder's surprise on untrusted bytes: the client's problem, not a 500 (logged)
        log.warning("%s of a request could not be decoded", name, exc_info=True)
        raise bad_request(f"{name} could not be decoded as a video; send an MP4 (H.264) or WebM file", param,
                          "invalid_video") from None
    return PreparedVideo(pixels, pixels.shape[0] * cfg.tokens_per_frame)


def _for_client(error: MediaError | VideoError) -> str:
    """The fetcher's message for clients, or the decoder's without advice meant for the operator."""
    if isinstance(error, MediaError):
        return error.client
    return _LIBRARY_ONLY_ADVICE.sub("; send a smaller video", _LIBRARY_ADVICE.sub("", str(error)))
