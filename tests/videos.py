"""Tiny videos written with PyAV inside the tests (nothing shipped, nothing downloaded), and a tiny
LLaVA-NeXT-Video checkpoint to show them to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from checkpoints import (
    build_hf_model,
    processor_config,
    text_config_dict,
    vision_config_dict,
    write_hf_checkpoint,
)

SIDE = 56  # a 4 x 4 patch grid at patch 14: 2 x 2 = 4 tokens per frame after pooling
PINPOINTS = [[56, 112], [112, 56], [112, 112]]
VIDEO_TOKENS = ("<video>", "<image>", "<pad>")  # llava-hf NeXT-Video ids: <video> 32000, <image> 32001


def noise_frames(count: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """(count, height, width, 3) uint8 random frames (never constant: constant frames hide bugs)."""
    return (np.random.RandomState(seed).rand(count, height, width, 3) * 255).astype("uint8")


def level_frames(count: int, width: int = 32, height: int = 24) -> np.ndarray:
    """Frame i is a flat gray of level 10 * i + 20, so a decoded frame tells which one it was."""
    levels = 10 * np.arange(count) + 20
    return np.broadcast_to(levels[:, None, None, None], (count, height, width, 3)).astype("uint8")


def write_video(path: Path, frames: np.ndarray, fps: int = 8, codec: str = "mpeg4", fmt: str | None = None,
                options: dict | None = None) -> Path:
    """Encode `frames` (F, H, W, 3) uint8; the container comes from the file name or `fmt`."""
    import av

    with av.open(str(path), "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path


def write_audio(path: Path, seconds: float = 0.5, rate: int = 8000) -> Path:
    """A WAV file: a container with no video stream."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        samples = (np.sin(np.arange(int(seconds * rate)) / 5) * 3000).astype("int16")[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def next_video_checkpoint(directory: Path, pool: str = "average", layout: str = "hub", seed: int = 0):
    """(transformers model, checkpoint directory) of a tiny LLaVA-NeXT-Video with linear RoPE scaling."""
    text = text_config_dict(num_key_value_heads=2,
                            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    hf = build_hf_model("llava_next_video", text=text, vision=vision_config_dict(image_size=SIDE), seed=seed,
                        image_token_index=32001, video_token_index=32000, image_grid_pinpoints=PINPOINTS,
                        spatial_pool_mode=pool)
    d = write_hf_checkpoint(hf, directory, layout, tokens=VIDEO_TOKENS,
                            processor=processor_config("LlavaNextImageProcessor", size=SIDE,
                                                       image_grid_pinpoints=PINPOINTS))
    return hf, d
