"""Videos for LLaVA-NeXT-Video (SPEC §4): reading untrusted files with PyAV under limits, uniform frame
sampling, and every sampled frame as a square CLIP input. CPU only, no model.

A video is a path, an http(s) or data: URL (fetched by processing/media.py like an image), raw bytes, or
frames already decoded (a uint8 array (frames, height, width, 3) or a list of PIL images). Decoding runs
frame by frame and keeps only the sampled frames, each reduced to its (3, S, S) pixel values at once, so
a long high-resolution video never sits in memory whole.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from llavakit.config import VideoConfig
from llavakit.processing.image import clip_transform, to_rgb
from llavakit.processing.media import FetchPolicy, read_source

FrameTransform = Callable[[Image.Image], np.ndarray]


class VideoError(ValueError):
    """A video could not be used; the message names the source and what to do."""


@dataclass(slots=True)
class VideoLimits:
    """Bounds on the work one video may cause. `max_bytes` replaces FetchPolicy.max_bytes for videos (they
    are larger than images); frames are counted as decoded, so a header that lies cannot lift the caps."""

    max_bytes: int = 256 * 2**20
    max_pixels: int = 4096 * 4096  # per frame: 4K UHD and DCI 4K pass
    max_frames: int = 54_000  # decoded frames: 30 minutes at 30 fps
    max_duration_s: float = 1800.0

    def __post_init__(self):
        if min(self.max_bytes, self.max_pixels, self.max_frames) <= 0 or self.max_duration_s <= 0:
            raise ValueError(f"VideoLimits must all be positive, got {self}")


def sample_indices(total: int, num_frames: int) -> list[int]:
    """`num_frames` frame indices spread evenly over [0, total - 1], as LLaVA-NeXT-Video samples
    (np.linspace(0, total - 1, N, dtype=int)); a video shorter than N repeats frames."""
    assert total > 0 and num_frames > 0, "sampling needs frames"
    return np.linspace(0, total - 1, num_frames, dtype=int).tolist()


def load_video(source: Any, cfg: VideoConfig, num_frames: int | None = None, policy: FetchPolicy | None = None,
               limits: VideoLimits | None = None) -> torch.Tensor:
    """Pixel values (N, 3, S, S) float32 of N frames sampled uniformly (N: `num_frames`, else the config's)."""
    limits = limits or VideoLimits()
    n = cfg.num_frames if num_frames is None else num_frames
    if n < 1:
        raise VideoError(f"a video needs at least one frame, got num_frames {n} (CLI: --video-frames)")
    name = _describe(source)

    def transform(img: Image.Image) -> np.ndarray:
        return clip_transform(to_rgb(img), cfg.frame)

    if isinstance(source, (np.ndarray, list, tuple)):
        frames = _given_frames(source, n, transform, limits, name)
    else:
        frames = _decoded_frames(_read_bytes(source, policy, limits, name), n, transform, limits, name)
    return torch.from_numpy(np.stack(frames))


def _describe(source: Any) -> str:
    """Name a source in an error message without echoing a data: URL, byte string or array."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape}>"
    if isinstance(source, (list, tuple)):
        return f"<{len(source)} frames>"
    text = str(source)
    if text[:5].lower() == "data:":
        return f"data URL ({len(text)} chars)"
    return text if len(text) <= 100 else text[:100] + "..."


def _check_pixels(width: int, height: int, limits: VideoLimits, name: str) -> None:
    if width <= 0 or height <= 0:
        raise VideoError(f"video {name} has an empty frame size {width}x{height}")
    if width * height > limits.max_pixels:
        raise VideoError(f"video {name} is {width}x{height} = {width * height} pixels a frame, over the "
                         f"{limits.max_pixels}-pixel limit; send a smaller video or raise VideoLimits.max_pixels")


# --- frames given as an array or a list of images ---------------------------------------------------------


def _given_frames(frames: np.ndarray | Sequence[Image.Image], n: int, transform: FrameTransform,
                  limits: VideoLimits, name: str) -> list[np.ndarray]:
    if isinstance(frames, np.ndarray) and (frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8):
        raise VideoError(f"a video array must be uint8 of shape (frames, height, width, 3), got "
                         f"{frames.dtype} {frames.shape}")
    if not isinstance(frames, np.ndarray) and not all(isinstance(f, Image.Image) for f in frames):
        raise VideoError(f"a video given as a list must hold PIL images (its frames), got {name}")
    if len(frames) == 0:
        raise VideoError("the video has no frames; pass at least one frame")
    indices = sample_indices(len(frames), n)
    done: dict[int, np.ndarray] = {}
    for i in sorted(set(indices)):  # a repeated frame is transformed once
        frame = frames[i] if isinstance(frames[i], Image.Image) else Image.fromarray(frames[i])
        _check_pixels(frame.width, frame.height, limits, name)
        done[i] = transform(frame)
    return [done[i] for i in indices]


# --- encoded video files ----------------------------------------------------------------------------------


def _read_bytes(source: Any, policy: FetchPolicy | None, limits: VideoLimits, name: str) -> bytes:
    """The file's bytes through the guarded fetcher, with the video byte cap."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > limits.max_bytes:
            raise VideoError(f"video {name} is over the {limits.max_bytes}-byte limit; raise VideoLimits.max_bytes")
        return bytes(source)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"a video must be a path, URL, data: URL, bytes, a uint8 frame array or a list of PIL "
                        f"images, got {type(source).__name__}")
    policy = dataclasses.replace(policy or FetchPolicy(), max_bytes=limits.max_bytes)
    text = str(source)
    local = "://" not in text and text[:5].lower() != "data:"
    if local and policy.allow_local_files:
        path = Path(text).expanduser()
        if not path.is_file():
            raise VideoError(f"video file {name!r} does not exist (or is not a file); check the path")
        if path.stat().st_size > limits.max_bytes:
            raise VideoError(f"video file {name!r} is {path.stat().st_size} bytes, over the {limits.max_bytes}-byte "
                             "limit; send a shorter or smaller video or raise VideoLimits.max_bytes")
    return read_source(text, policy)


def _import_av():
    try:
        import av
    except ImportError:
        raise VideoError("reading video files needs PyAV; install it with `pip install av`") from None
    return av


@contextmanager
def _open(data: bytes, name: str) -> Iterator[Any]:
    """An open PyAV container over `data`. No protocol is whitelisted, so a playlist or concat script cannot
    make FFmpeg open other files or URLs."""
    av = _import_av()
    try:
        container = av.open(io.BytesIO(data), mode="r", options={"protocol_whitelist": "none"})
    except Exception:  # noqa: BLE001 - FFmpeg reports unreadable input with many error types; none may escape
        raise VideoError(f"{name} could not be read as a video; send an MP4, WebM, MKV, AVI or MOV file") from None
    try:
        yield container
    finally:
        container.close()


def _video_stream(container: Any, limits: VideoLimits, name: str) -> Any:
    """The first video stream, after checking what the header says about its size and length."""
    fmt = container.format.name
    if fmt == "image2" or fmt.endswith("_pipe"):
        raise VideoError(f"{name} is a still image ({fmt}), not a video; pass it as an image instead")
    if not container.streams.video:
        raise VideoError(f"{name} has no video stream (an audio-only or data file?); send a video file")
    stream = container.streams.video[0]
    codec = stream.codec_context  # None when the header is cut short
    width, height = (codec.width, codec.height) if codec is not None else (0, 0)
    if width and height:  # 0 x 0 when the header does not say; decoded frames are checked anyway
        _check_pixels(width, height, limits, name)
    duration = _duration_s(container, stream)
    if duration > limits.max_duration_s:
        raise VideoError(f"video {name} lasts {duration:.0f} s, over the {limits.max_duration_s:.0f} s limit; "
                         "send a shorter clip or raise VideoLimits.max_duration_s")
    _check_frame_count(stream.frames, limits, name)
    return stream


def _duration_s(container: Any, stream: Any) -> float:
    """Seconds the header claims (0 when it says nothing)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / 1_000_000 if container.duration else 0.0  # container.duration is in AV_TIME_BASE


def _check_frame_count(count: int, limits: VideoLimits, name: str) -> None:
    if count > limits.max_frames:
        raise VideoError(f"video {name} has more than {limits.max_frames} frames; send a shorter clip or raise "
                         "VideoLimits.max_frames")


def _frame_count(data: bytes, limits: VideoLimits, name: str) -> int:
    """Frames in the video: the header's count, else one per demuxed packet (WebM/MKV record no count)."""
    with _open(data, name) as container:
        stream = _video_stream(container, limits, name)
        if stream.frames > 0:
            return stream.frames
        count = 0
        try:
            for packet in container.demux(stream):
                count += packet.size > 0  # the final flush packet is empty
                _check_frame_count(count, limits, name)
        except VideoError:
            raise
        except Exception:  # noqa: BLE001 - a damaged tail: count what came before it
            return count
        return count


def _decode_at(data: bytes, indices: list[int], transform: FrameTransform, limits: VideoLimits,
               name: str) -> tuple[dict[int, np.ndarray], int]:
    """The transformed frames at `indices` and how many frames were decoded (decoding stops after the last
    wanted one, at the end of the stream, or at the first damaged packet)."""
    wanted, last, out, decoded = set(indices), max(indices), {}, 0
    with _open(data, name) as container:
        stream = _video_stream(container, limits, name)
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                _check_frame_count(decoded, limits, name)
                if i in wanted:
                    _check_pixels(frame.width, frame.height, limits, name)  # the size may change mid-stream
                    out[i] = transform(frame.to_image())
                if i >= last:
                    break
        except VideoError:
            raise
        except Exception:  # noqa: BLE001 - a truncated or corrupt stream: keep the frames before the damage
            return out, decoded
    return out, decoded


def _decoded_frames(data: bytes, n: int, transform: FrameTransform, limits: VideoLimits,
                    name: str) -> list[np.ndarray]:
    total = _frame_count(data, limits, name)
    indices = sample_indices(max(total, 1), n)
    frames, decoded = _decode_at(data, indices, transform, limits, name)
    if decoded == 0:
        raise VideoError(f"no frame of video {name} could be decoded; the file is damaged or its codec is not "
                         "supported by FFmpeg")
    if not frames.keys() >= set(indices):
        # The stream held fewer frames than its header said: sample again over the frames that exist.
        indices = sample_indices(decoded, n)
        frames, _ = _decode_at(data, indices, transform, limits, name)
    missing = sorted(set(indices) - frames.keys())
    if missing:
        raise VideoError(f"frames {missing[:5]} of video {name} could not be decoded twice alike; the file is damaged")
    return [frames[i] for i in indices]

