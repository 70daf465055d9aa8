"""LLaVA-NeXT-Video against transformers' LlavaNextVideoForConditionalGeneration on tiny random checkpoints,
for a video file each test encodes with PyAV: the same pixel values, the same number of video tokens and
input ids, fp32 last-position logits within 1e-4, and 20 identical greedy tokens; alone and mixed with an
image, with average and max pooling.

References: frames are read by transformers' own `read_video_pyav` with LLaVA-NeXT-Video's uniform
sampling and preprocessed by `CLIPImageProcessorPil` (transformers' video processor needs torchvision,
which is not installed; it runs the same resize / crop / normalize steps with torchvision's resize). The
video-token count is transformers' `LlavaNextVideoProcessor.replace_video_token`. Text is tokenized with
`TokenizersBackend`, the tokenizer transformers gives llava and llava_next checkpoints: for llava_next_video
it builds a LlamaTokenizer that drops the "▁" the original LLaVA-NeXT-Video prompt has after a media tag.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from checkpoints import build_hf_model, processor_config, write_hf_checkpoint
from conftest import noise_image
from transformers import LlavaNextProcessor, LlavaNextVideoProcessor, TokenizersBackend
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.video_utils import read_video_pyav
from videos import PINPOINTS, SIDE, next_video_checkpoint, noise_frames, write_video

import llavakit
from llavakit.processing.video import VideoError

PROMPT = "Why is this video funny?"
SIZE = {"size": {"shortest_edge": SIDE}, "crop_size": {"height": SIDE, "width": SIDE}}


@pytest.fixture(scope="module")
def average(tmp_path_factory):
    root = tmp_path_factory.mktemp("nextvideo")
    hf, d = next_video_checkpoint(root / "ck", "average", "hub")
    (d / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "LlavaNextVideoVideoProcessor", "num_frames": 6, **SIZE}))
    video = write_video(root / "clip.mp4", noise_frames(9, 48, 36))
    return hf, d, llavakit.load(d, dtype="float32", device="cpu"), video


def reference_inputs(d, text: str, video, num_frames: int, images=()) -> dict:
    """transformers' inputs for `text` (one <video> tag) with `video` and `images`."""
    frames, _ = read_video_pyav(str(video), sample_indices_fn=lambda metadata, **_: np.linspace(
        0, metadata.total_num_frames - 1, num_frames, dtype=int))
    pixels = CLIPImageProcessorPil(**SIZE)(images=list(frames), return_tensors="pt")["pixel_values"][None]
    fake_processor = types.SimpleNamespace(patch_size=14, video_token="<video>")
    n = LlavaNextVideoProcessor.replace_video_token(fake_processor, {"pixel_values_videos": pixels}, 0).count("<video>")
    tok = TokenizersBackend.from_pretrained(d)
    text = text.replace("<video>", "<video>" * n)
    if images:
        proc = LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(image_grid_pinpoints=PINPOINTS, **SIZE),
                                  tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                                  num_additional_image_tokens=1)
        inputs = dict(proc(images=list(images), text=text, return_tensors="pt"))
    else:
        inputs = dict(tok(text, return_tensors="pt"))
    return {**inputs, "pixel_values_videos": pixels, "num_video_tokens": n}


def our_last_logits(pipe, inputs) -> torch.Tensor:
    model, ids = pipe.model, inputs.ids
    with torch.inference_mode():
        feats = model.encode_media([m.pixel_values for m in inputs.media], [m.size for m in inputs.media])
        hidden = model(model.embed_inputs(torch.tensor([ids]), feats), torch.arange(len(ids))[None])
        return model.compute_logits(hidden[0, -1])


def assert_video_parity(pipe, hf, d, video, prompt=PROMPT, images=(), num_frames=6):
    """The four acceptance checks for one prompt with one video (and `images`)."""
    text = pipe.processor.render_prompt(prompt, len(images), num_videos=1)
    inputs = pipe.processor.encode_prompt(text, pipe.processor.prepare_images(list(images)),
                                          pipe.processor.prepare_videos([str(video)]))
    ref = reference_inputs(d, text, video, num_frames, images)
    n_video = ref.pop("num_video_tokens")
    clip = next(m for m in inputs.media if isinstance(m, llavakit.processing.prompt.PreparedVideo))
    assert clip.num_frames == num_frames and clip.num_tokens == n_video == num_frames * 4
    torch.testing.assert_close(clip.pixel_values, ref["pixel_values_videos"][0], atol=1e-5, rtol=0)
    assert ref["input_ids"][0].tolist() == inputs.ids
    with torch.no_grad():
        ref_logits = hf(**ref).logits[0, -1]
        ref_tokens = hf.generate(**ref, max_new_tokens=20, do_sample=False)[0, len(inputs.ids):].tolist()
    torch.testing.assert_close(our_last_logits(pipe, inputs), ref_logits, atol=1e-4, rtol=1e-4)
    out = pipe.generate(prompt, images=list(images), videos=[str(video)], max_new_tokens=20)
    assert out.prompt_token_ids == inputs.ids and out.token_ids == ref_tokens
    return inputs


def test_video_file_average_pooling(average):
    hf, d, pipe, video = average
    cfg = pipe.config
    assert (cfg.video.num_frames, cfg.tokens_per_frame, cfg.text.rope.kind) == (6, 4, "linear")
    inputs = assert_video_parity(pipe, hf, d, video)
    assert inputs.ids.count(32000) == 24 and 32001 not in inputs.ids


def test_image_then_video_in_one_prompt(average):
    hf, d, pipe, video = average
    inputs = assert_video_parity(pipe, hf, d, video, images=[noise_image(100, 30, seed=2)])
    first_image, first_video = inputs.ids.index(32001), inputs.ids.index(32000)
    assert first_image < first_video  # the template puts "<image>\n<video>\n" before the question


def test_video_placed_before_an_image_by_the_prompt(average):
    hf, d, pipe, video = average
    prompt = "Does the video <video> show what this picture <image> shows?"
    inputs = assert_video_parity(pipe, hf, d, video, prompt=prompt, images=[noise_image(30, 70, seed=3)])
    assert inputs.ids.index(32000) < inputs.ids.index(32001)


def test_max_pooling_save_pretrained_layout_and_frames_at_load(tmp_path):
    hf, d = next_video_checkpoint(tmp_path / "ck", "max", "save_pretrained", seed=4)
    video = write_video(tmp_path / "clip.mp4", noise_frames(7, 40, 50, seed=1))
    pipe = llavakit.load(d, dtype="float32", device="cpu", num_frames=3)
    assert pipe.config.spatial_pool_mode == "max" and pipe.config.video.num_frames == 3
    assert_video_parity(pipe, hf, d, video, num_frames=3)


def test_video_errors_at_generate(average, tmp_path):
    _, _, pipe, video = average
    with pytest.raises(ValueError, match="the prompt has 2 <video> tags but 1 videos were given"):
        pipe.generate("<video> and <video>?", videos=[str(video)], max_new_tokens=2)
    with pytest.raises(VideoError, match="could not be read as a video"):
        pipe.generate(PROMPT, videos=[b"\x00" * 500], max_new_tokens=2)
    llava = build_hf_model("llava")
    d = write_hf_checkpoint(llava, tmp_path / "llava", "hub", processor=processor_config("LlavaImageProcessor"))
    with pytest.raises(VideoError, match=r"this checkpoint \(llava\) takes no videos; use a LLaVA-NeXT-Video"):
        llavakit.load(d, dtype="float32", device="cpu").generate(PROMPT, videos=[str(video)])
