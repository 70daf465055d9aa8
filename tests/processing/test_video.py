"""Video reading: uniform frame sampling from real files (with and without a frame count in the header),
the same pixels from a path, bytes, a data: URL or frames already decoded, and a clear VideoError for
every bad input (not a video, a still image, no video stream, nothing decodable, too big, too long)."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from videos import level_frames, noise_frames, write_audio, write_video

from llavakit.config import ImageConfig, VideoConfig
from llavakit.processing.video import (
    VideoError,
    VideoLimits,
    load_video,
    sample_indices,
)

FRAME = ImageConfig(mode="crop", size=24, crop_size=24)
CFG = VideoConfig(num_frames=5, frame=FRAME)


def _levels(pixels: torch.Tensor) -> list[int]:
    """The gray level each flat frame had (undoing the CLIP normalization of channel 0)."""
    level = (pixels[:, 0].mean((1, 2)) * FRAME.std[0] + FRAME.mean[0]) * 255
    return level.round().int().tolist()


def _raises(pattern: str, *args, **kwargs) -> None:
    with pytest.raises(VideoError) as info:
        load_video(*args, **kwargs)
    assert re.search(pattern, str(info.value)), str(info.value)
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)


def test_sample_indices_spread_over_the_whole_video():
    assert sample_indices(20, 5) == [0, 4, 9, 14, 19]
    assert sample_indices(300, 32) == np.linspace(0, 299, 32, dtype=int).tolist()
    assert sample_indices(3, 5) == [0, 0, 1, 1, 2]  # shorter than asked: frames repeat, as LLaVA-NeXT-Video does
    assert sample_indices(1, 3) == [0, 0, 0]


@pytest.mark.parametrize("name", ["clip.mp4", "clip.mkv"])  # MKV records no frame count: packets are counted
def test_uniform_frames_from_a_file(tmp_path, name):
    path = write_video(tmp_path / name, level_frames(20))
    pixels = load_video(str(path), CFG)
    assert pixels.shape == (5, 3, 24, 24) and pixels.dtype == torch.float32
    # Frames 0, 4, 9, 14, 19 have levels 20, 60, 110, 160, 210; MPEG-4 loses a few levels.
    assert np.allclose(_levels(pixels), [20, 60, 110, 160, 210], atol=4)


def test_num_frames_overrides_the_config(tmp_path):
    path = write_video(tmp_path / "clip.mp4", level_frames(20))
    assert load_video(path, CFG, num_frames=2).shape[0] == 2
    assert np.allclose(_levels(load_video(path, CFG, num_frames=2)), [20, 210], atol=4)


def test_path_bytes_data_url_and_decoded_frames_agree(tmp_path):
    path = write_video(tmp_path / "clip.mp4", noise_frames(9, 40, 30))
    from_path = load_video(str(path), CFG)
    data = path.read_bytes()
    torch.testing.assert_close(load_video(data, CFG), from_path, rtol=0, atol=0)
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    torch.testing.assert_close(load_video(url, CFG), from_path, rtol=0, atol=0)
    import av

    with av.open(str(path)) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    torch.testing.assert_close(load_video(decoded, CFG), from_path, rtol=0, atol=0)
    torch.testing.assert_close(load_video([Image.fromarray(f) for f in decoded], CFG), from_path, rtol=0, atol=0)


def test_frames_are_square_clip_crops_of_the_whole_frame():
    """A wide frame: the short side is resized to 24 and the middle cropped, never padded."""
    frames = np.zeros((1, 24, 48, 3), dtype="uint8")
    frames[0, :, 12:36] = 255  # the white middle half is exactly what the crop keeps
    pixels = load_video(frames, VideoConfig(num_frames=1, frame=FRAME))
    assert pixels.shape == (1, 3, 24, 24)
    assert torch.allclose(pixels[0, 0, :, 2:-2], torch.tensor((1 - FRAME.mean[0]) / FRAME.std[0]), atol=1e-4)


def test_a_header_that_promises_more_frames_than_the_file_holds(tmp_path):
    """A cut file whose index (moov first) still lists 20 frames: sample again over what decodes."""
    data = write_video(tmp_path / "fast.mp4", level_frames(20), options={"movflags": "faststart"}).read_bytes()
    mdat = data.find(b"mdat")
    pixels = load_video(data[: mdat + (len(data) - mdat) // 2], CFG)
    levels = _levels(pixels)
    assert len(levels) == 5 and levels == sorted(levels) and levels[0] < 25 and levels[-1] < 160


# --- bad input ------------------------------------------------------------------------------------------


def test_not_a_video():
    _raises(r"<2400 bytes> could not be read as a video; send an MP4", b"not a video " * 200, CFG)


def test_a_still_image_is_refused_as_a_video():
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(buf, format="PNG")
    _raises(r"is a still image \(png_pipe\), not a video; pass it as an image", buf.getvalue(), CFG)


@pytest.mark.parametrize("script", ["#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2.5,\n{path}\n#EXT-X-ENDLIST\n",
                                    "ffconcat version 1.0\nfile {path}\n", "ffconcat version 1.0\nfile file:{path}\n"])
def test_a_playlist_cannot_make_ffmpeg_open_other_files(tmp_path, script):
    path = write_video(tmp_path / "secret.mp4", level_frames(4))
    _raises(r"could not be read as a video", script.format(path=path).encode(), CFG)


def test_audio_only_file(tmp_path):
    _raises(r"has no video stream", str(write_audio(tmp_path / "sound.wav")), CFG)


def test_zero_decodable_frames(tmp_path):
    data = write_video(tmp_path / "fast.mp4", level_frames(20), options={"movflags": "faststart"}).read_bytes()
    _raises(r"no frame of video <\d+ bytes> could be decoded; the file is damaged", data[: data.find(b"mdat") + 8],
            CFG)


def test_a_header_cut_short_is_a_clear_error(tmp_path):
    data = write_video(tmp_path / "fast.mp4", level_frames(20), options={"movflags": "faststart"}).read_bytes()
    with pytest.raises(VideoError):
        load_video(data[:400], CFG)


def test_huge_resolution(tmp_path):
    path = write_video(tmp_path / "big.mp4", noise_frames(2, 64, 48))
    _raises(r"is 64x48 = 3072 pixels a frame, over the 3000-pixel limit.*VideoLimits.max_pixels", str(path), CFG,
            limits=VideoLimits(max_pixels=3000))
    _raises(r"over the 3000-pixel limit", noise_frames(2, 64, 48), CFG, limits=VideoLimits(max_pixels=3000))


def test_long_duration_and_too_many_frames(tmp_path):
    mp4 = write_video(tmp_path / "long.mp4", level_frames(20), fps=8)  # 2.5 s
    _raises(r"lasts 2 s, over the 1 s limit; send a shorter clip", str(mp4), CFG, limits=VideoLimits(max_duration_s=1))
    _raises(r"has more than 10 frames", str(mp4), CFG, limits=VideoLimits(max_frames=10))
    mkv = write_video(tmp_path / "long.mkv", level_frames(20), fps=8)  # no count in the header: counted
    _raises(r"has more than 10 frames", str(mkv), CFG, limits=VideoLimits(max_frames=10))


def test_byte_cap_and_missing_file(tmp_path):
    path = write_video(tmp_path / "clip.mp4", level_frames(4))
    _raises(r"is \d+ bytes, over the 100-byte limit.*VideoLimits.max_bytes", str(path), CFG,
            limits=VideoLimits(max_bytes=100))
    _raises(r"over the 100-byte limit", path.read_bytes(), CFG, limits=VideoLimits(max_bytes=100))
    _raises(r"video file '.*nope.mp4' does not exist", str(tmp_path / "nope.mp4"), CFG)


def test_bad_frame_arrays():
    _raises(r"must be uint8 of shape \(frames, height, width, 3\), got float32 \(2, 8, 8, 3\)",
            np.zeros((2, 8, 8, 3), dtype="float32"), CFG)
    _raises(r"must be uint8 of shape", np.zeros((8, 8, 3), dtype="uint8"), CFG)
    _raises(r"the video has no frames", [], CFG)
    _raises(r"must hold PIL images", ["a.png"], CFG)
