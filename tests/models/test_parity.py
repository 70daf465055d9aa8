"""llavakit against transformers on tiny random checkpoints in every layout.

For each checkpoint: the same pixel values as transformers' image processors (atol 1e-5), the same input
ids (hence the same number of image tokens), fp32 last-position logits within 1e-4, and 20 identical
greedy tokens.
"""

from __future__ import annotations

import pytest
from checkpoints import (
    IMAGE_TOKEN_ID,
    PINPOINTS,
    build_hf_model,
    processor_config,
    text_config_dict,
    vision_config_dict,
    write_hf_checkpoint,
)
from conftest import noise_image
from parity import assert_parity, hf_processor

import llavakit


def _load(d):
    return llavakit.load(d, dtype="float32", device="cpu")


@pytest.mark.parametrize("layout", ["hub", "transformers-5", "save_pretrained"])
def test_llava15_mha_every_hf_layout(tmp_path, layout):
    hf = build_hf_model("llava")
    d = write_hf_checkpoint(hf, tmp_path / layout, layout,
                            processor=processor_config("LlavaImageProcessor", do_pad=True))
    pipe = _load(d)
    assert pipe.config.image.mode == "pad"
    proc = hf_processor("llava", d)
    ids = assert_parity(pipe, hf, proc, [noise_image(60, 40)])
    assert ids.count(IMAGE_TOKEN_ID) == 4
    assert_parity(pipe, hf, proc, [noise_image(30, 90, seed=1)])


def test_llava15_several_images_in_order(tmp_path):
    """Several images in one prompt: placed by the template, or where the prompt's tags put them."""
    hf = build_hf_model("llava", seed=5)
    d = write_hf_checkpoint(hf, tmp_path / "multi", "hub",
                            processor=processor_config("LlavaImageProcessor", do_pad=True))
    pipe = _load(d)
    proc = hf_processor("llava", d)
    images = [noise_image(60, 40, seed=1), noise_image(30, 90, seed=2), noise_image(50, 50, seed=3)]
    ids = assert_parity(pipe, hf, proc, images)
    assert ids.count(IMAGE_TOKEN_ID) == 12
    ids = assert_parity(pipe, hf, proc, images[:2], prompt="Is <image> the same scene as <image>? Say why.")
    first = ids.index(IMAGE_TOKEN_ID)
    assert ids[first:first + 4] == [IMAGE_TOKEN_ID] * 4 and ids[first + 4] != IMAGE_TOKEN_ID  # text between


def test_llava15_clip_processor_means_no_pad(tmp_path):
    """llava-hf 1.5 repos ship a CLIPImageProcessor: no expand2square, as transformers does."""
    hf = build_hf_model("llava")
    d = write_hf_checkpoint(hf, tmp_path / "c", "hub", processor=processor_config("CLIPImageProcessor"))
    pipe = _load(d)
    assert pipe.config.image.mode == "crop"
    assert_parity(pipe, hf, hf_processor("llava", d, pad=False), [noise_image(70, 30)])


NEXT_IMAGES = {"wide": (100, 30), "tall": (25, 90), "small": (9, 7), "very_large": (2000, 1500), "square": (56, 56)}


@pytest.fixture(scope="module")
def next_gqa(tmp_path_factory):
    text = text_config_dict(num_key_value_heads=2, rope_theta=1e6)
    hf = build_hf_model("llava_next", text=text)
    d = write_hf_checkpoint(hf, tmp_path_factory.mktemp("next") / "ck", "hub", shards=3,
                            processor=processor_config("LlavaNextImageProcessor", image_grid_pinpoints=PINPOINTS))
    return hf, d, _load(d)


@pytest.mark.parametrize("name", sorted(NEXT_IMAGES))
def test_llava_next_anyres_gqa(next_gqa, name):
    hf, d, pipe = next_gqa
    assert pipe.config.image.mode == "anyres" and pipe.config.text.num_key_value_heads == 2
    assert pipe.config.text.rope.theta == 1e6
    assert_parity(pipe, hf, hf_processor("llava_next", d), [noise_image(*NEXT_IMAGES[name])])


def test_llava_next_two_images_and_transformers5_layout(next_gqa, tmp_path):
    hf, _, _ = next_gqa
    d = write_hf_checkpoint(hf, tmp_path / "t5", "transformers-5",
                            processor=processor_config("LlavaNextImageProcessor", image_grid_pinpoints=PINPOINTS))
    pipe = _load(d)
    images = [noise_image(100, 30), noise_image(20, 50, seed=3)]
    assert_parity(pipe, hf, hf_processor("llava_next", d), images)


def test_llava_next_images_placed_by_the_prompt(next_gqa):
    hf, d, pipe = next_gqa
    images = [noise_image(20, 50, seed=4), noise_image(100, 30, seed=5), noise_image(9, 7, seed=6)]
    prompt = "First <image>, then <image>; which one matches <image> best?"
    ids = assert_parity(pipe, hf, hf_processor("llava_next", d), images, prompt=prompt)
    counts = [p.num_tokens for p in pipe.processor.prepare_images(images)]
    assert ids.count(IMAGE_TOKEN_ID) == sum(counts) and len(set(counts)) > 1  # AnyRes: each image its own count


@pytest.mark.parametrize("window", [None, 24])
def test_mistral_backbone(tmp_path, window):
    text = text_config_dict("mistral", num_key_value_heads=2, sliding_window=window)
    hf = build_hf_model("llava_next", text=text, seed=1)
    d = write_hf_checkpoint(hf, tmp_path / "m", "hub",
                            processor=processor_config("LlavaNextImageProcessor", image_grid_pinpoints=PINPOINTS))
    pipe = _load(d)
    assert pipe.config.text.model_type == "mistral" and pipe.template.name == "mistral_instruct"
    assert pipe.config.text.sliding_window == window
    assert_parity(pipe, hf, hf_processor("llava_next", d), [noise_image(60, 40)])


def test_config_variety_tied_bias_full_multilayer_linear_rope(tmp_path):
    text = text_config_dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    hf = build_hf_model("llava", text=text, vision=vision_config_dict(), vision_feature_layer=[-3, -1],
                        vision_feature_select_strategy="full", tie_word_embeddings=True)
    d = write_hf_checkpoint(hf, tmp_path / "v", "hub", processor=processor_config("LlavaImageProcessor", do_pad=True))
    pipe = _load(d)
    cfg = pipe.config
    assert cfg.text.tie_word_embeddings and cfg.text.rope.kind == "linear" and cfg.feature_layers == [1, 3]
    assert pipe.model.lm_head.weight is pipe.model.language_model.embed_tokens.weight
    ids = assert_parity(pipe, hf, hf_processor("llava", d, select="full"), [noise_image(50, 50)])
    assert ids.count(IMAGE_TOKEN_ID) == 5  # 2 x 2 patches + CLS


def test_dynamic_rope_beyond_trained_length(tmp_path):
    text = text_config_dict(max_position_embeddings=48, rope_scaling={"type": "dynamic", "factor": 2.0})
    hf = build_hf_model("llava", text=text)
    d = write_hf_checkpoint(hf, tmp_path / "dyn", "hub", processor=processor_config("LlavaImageProcessor", do_pad=True))
    pipe = _load(d)
    assert pipe.config.text.rope.kind == "dynamic" and pipe.config.text.context_length == 96
    assert_parity(pipe, hf, hf_processor("llava", d), [noise_image(40, 40)])


def test_text_only_prompt(next_gqa):
    hf, d, pipe = next_gqa
    assert_parity(pipe, hf, hf_processor("llava_next", d), [])
