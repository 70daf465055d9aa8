"""Saving in the llava-hf format.

A saved checkpoint must load into transformers with no missing or unexpected keys, every tensor equal
to the reference model's and last-position logits equal to llavakit's; llavakit must load it back to the
same config and identical logits. Also: shards, original-layout conversion, configs whose every field
round-trips through both readers, and the models the format cannot hold.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from checkpoints import (
    IMAGE_TOKEN_ID,
    PINPOINTS,
    build_hf_model,
    processor_config,
    save_tokenizer,
    text_config_dict,
    write_hf_checkpoint,
    write_original_checkpoint,
)
from conftest import noise_image
from parity import PROMPT, our_last_logits
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

import llavakit
from llavakit.checkpoint_config import read_checkpoint_config
from llavakit.config import ORIGINAL_IMAGE_TOKEN_ID, ImageConfig, LlavaConfig, RopeConfig, TextConfig, VisionConfig
from llavakit.weights.name_maps import LLAVA_HF, map_name
from llavakit.weights.save import (
    TO_LLAVA_HF,
    hf_config_dict,
    preprocessor_config_dict,
    save_llava_hf,
    state_dict_for_hf,
    unused_source_tensors,
)

IMAGE = noise_image(70, 30)
NO_PROBLEMS = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")


def _load(d, **kw):
    return llavakit.load(d, dtype="float32", device="cpu", **kw)


def _ours(pipe, image=IMAGE):
    prepared = pipe.processor.prepare_images([image])
    ids = pipe.processor.tokenize(pipe.processor.render_prompt(PROMPT, 1), prepared)
    return ids, prepared, our_last_logits(pipe, ids, prepared)


def _hf_logits(model, ids, prepared, image_token_id=IMAGE_TOKEN_ID):
    """transformers' last-position logits on llavakit's ids and pixel values (themselves parity-tested)."""
    t = torch.tensor([[image_token_id if i == ORIGINAL_IMAGE_TOKEN_ID else i for i in ids]])
    pixels = prepared[0].pixel_values
    inputs = dict(input_ids=t, attention_mask=torch.ones_like(t), pixel_values=pixels)
    if model.config.model_type == "llava_next":
        inputs.update(pixel_values=pixels[None], image_sizes=torch.tensor([prepared[0].size]))
    with torch.no_grad():
        return model(**inputs).logits[0, -1]


def _load_hf(directory):
    model, info = AutoModelForImageTextToText.from_pretrained(directory, output_loading_info=True)
    assert {k: info[k] for k in NO_PROBLEMS} == {k: type(info[k])() for k in NO_PROBLEMS}
    return model.eval()


def _assert_same_weights_and_logits(pipe, other) -> None:
    """Every parameter bit-identical; logits only to 1 ulp-ish, since a memory-mapped tensor's alignment
    (which differs between one file and shards) can change the CPU kernels' summation order."""
    theirs = dict(other.model.named_parameters())
    for name, p in pipe.model.named_parameters():
        assert torch.equal(p, theirs[name]), name
    torch.testing.assert_close(_ours(other)[2], _ours(pipe)[2], atol=1e-6, rtol=0)


def _comparable(cfg: LlavaConfig) -> LlavaConfig:
    return dataclasses.replace(cfg, name_or_path=None, vision_tower_dir=None)


CASES = {
    "llava_mlp2x_pad": dict(model_type="llava", processor=processor_config("LlavaImageProcessor", do_pad=True)),
    "next_anyres_gqa_tied_linear_rope": dict(
        model_type="llava_next", tie_word_embeddings=True,
        text=text_config_dict(num_key_value_heads=2, tie_word_embeddings=True,
                              rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
        processor=processor_config("LlavaNextImageProcessor", image_grid_pinpoints=PINPOINTS)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def source(request, tmp_path_factory):
    kw = dict(CASES[request.param])
    processor = kw.pop("processor")
    hf = build_hf_model(kw.pop("model_type"), seed=3, **kw)
    d = write_hf_checkpoint(hf, tmp_path_factory.mktemp(request.param) / "src", "hub", processor=processor)
    return hf, d, _load(d)


def test_unused_source_tensors_are_exactly_the_unbuilt_tower(source):
    hf, d, pipe = source
    extra = unused_source_tensors(d, pipe.config)
    reference = {"vision_tower.vision_model." + k[len("model.vision_tower."):]: v
                 for k, v in hf.state_dict().items() if k.startswith("model.vision_tower.")}
    unbuilt = re.compile(r"vision_tower\.vision_model\.(post_layernorm|encoder\.layers\.2)\.")  # -2 of 3 layers
    assert set(extra) == {k for k in reference if unbuilt.match(k)}
    for k, v in extra.items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=0)


def test_names_invert_the_llava_hf_map(source):
    _, _, pipe = source
    for name, _ in pipe.model.named_parameters():
        assert map_name(map_name(name, TO_LLAVA_HF), LLAVA_HF) == name
    assert ("language_model.lm_head.weight" in state_dict_for_hf(pipe.model)) != pipe.config.text.tie_word_embeddings


def test_transformers_and_llavakit_load_the_saved_checkpoint(source, tmp_path):
    hf, d, pipe = source
    out = save_llava_hf(pipe.model, tmp_path / "out", tokenizer=pipe.tokenizer,
                        extra_tensors=unused_source_tensors(d, pipe.config))
    ids, prepared, ours = _ours(pipe)

    ref = _load_hf(out)
    assert type(ref) is type(hf) and ref.config.image_token_id == IMAGE_TOKEN_ID
    saved = ref.state_dict()
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0, msg=k)
    torch.testing.assert_close(_hf_logits(ref, ids, prepared), ours, atol=1e-5, rtol=0)

    back = _load(out)
    assert _comparable(back.config) == _comparable(pipe.config)
    _assert_same_weights_and_logits(pipe, back)
    assert AutoProcessor.from_pretrained(out)(images=[IMAGE], text=back.processor.render_prompt(PROMPT, 1),
                                              return_tensors="pt").input_ids[0].tolist() == ids


def test_shards_and_index(source, tmp_path):
    _, d, pipe = source
    extra = unused_source_tensors(d, pipe.config)
    out = save_llava_hf(pipe.model, tmp_path / "sharded", tokenizer=pipe.tokenizer, extra_tensors=extra,
                        max_shard_bytes=2_000_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map) == set(state_dict_for_hf(pipe.model)) | set(extra)
    assert sorted(set(weight_map.values())) == shards
    _assert_same_weights_and_logits(pipe, _load(out))
    _load_hf(out)


def test_bfloat16_model_saves_bfloat16(source, tmp_path):
    _, d, _ = source
    pipe = llavakit.load(d, dtype="bfloat16", device="cpu")
    out = save_llava_hf(pipe.model, tmp_path / "bf16", tokenizer=pipe.tokenizer,
                        extra_tensors=unused_source_tensors(d, pipe.config))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 (safe_open is not iterable)
    back = llavakit.load(out, dtype="bfloat16", device="cpu")
    theirs = dict(back.model.named_parameters())
    assert all(torch.equal(p, theirs[n]) and p.dtype == torch.bfloat16 for n, p in pipe.model.named_parameters())


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    root = tmp_path_factory.mktemp("orig")
    hf = build_hf_model("llava", seed=2)
    d = write_original_checkpoint(hf, root / "llava-v1.5-tiny", root / "clip-tower")
    save_tokenizer(d, extra_tokens=())
    return hf, d, _load(d, vision_tower=root / "clip-tower")


def test_original_layout_converts_to_llava_hf(original, tmp_path):
    hf, d, pipe = original
    tokenizer = AutoTokenizer.from_pretrained(d)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    token = tokenizer.convert_tokens_to_ids("<image>")
    extra = unused_source_tensors(d, pipe.config)  # from the separate CLIP directory
    assert "vision_tower.vision_model.post_layernorm.weight" in extra
    bare = dataclasses.replace(pipe.config, vision_tower_dir=None)
    assert unused_source_tensors(pipe.config.vision_tower_dir, bare, layout="clip").keys() == extra.keys()
    out = save_llava_hf(pipe.model, tmp_path / "hf", tokenizer=tokenizer, extra_tensors=extra, image_token_id=token)
    ids, prepared, ours = _ours(pipe)
    assert ORIGINAL_IMAGE_TOKEN_ID in ids

    ref = _load_hf(out)
    torch.testing.assert_close(_hf_logits(ref, ids, prepared, token), ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(_hf_logits(ref, ids, prepared, token), _hf_logits(hf, ids, prepared, token),
                               rtol=0, atol=0)

    back = _load(out)
    assert back.config.layout == "llava-hf" and back.config.image_token_id == token
    assert _ours(back)[0] == [token if i == ORIGINAL_IMAGE_TOKEN_ID else i for i in ids]
    _assert_same_weights_and_logits(pipe, back)


def test_original_layout_needs_an_image_token(original, tmp_path):
    _, _, pipe = original
    with pytest.raises(ValueError, match=r"placeholder id -200.*add '<image>' to the tokenizer"):
        save_llava_hf(pipe.model, tmp_path / "x")
    with pytest.raises(ValueError, match="outside the embedding"):
        save_llava_hf(pipe.model, tmp_path / "x", image_token_id=pipe.config.text.vocab_size)
    with pytest.raises(ValueError, match=r"tokenizer's '<image>' token is None"):
        save_llava_hf(pipe.model, tmp_path / "x", tokenizer=pipe.tokenizer, image_token_id=32000)
    assert not (tmp_path / "x").exists()


def test_linear_projector_cannot_be_saved(tmp_path):
    hf = build_hf_model("llava", seed=6)
    d = write_original_checkpoint(hf, tmp_path / "llavar", tmp_path / "tower", projector="linear", aspect="square")
    save_tokenizer(d, extra_tokens=())
    pipe = _load(d, vision_tower=tmp_path / "tower")
    with pytest.raises(ValueError, match=r"llava-hf format cannot hold a 'linear' projector.*keep the original layout"):
        save_llava_hf(pipe.model, tmp_path / "out", image_token_id=32000)
    assert not (tmp_path / "out").exists()


def _config(text=None, image=None, **top) -> LlavaConfig:
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=28, patch_size=14)
    text = text or TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              vocab_size=32064, max_position_embeddings=512, rope=RopeConfig(original_max_position=512))
    return LlavaConfig(vision=vision, text=text, image=image or ImageConfig(size=28, crop_size=28), **top)


@pytest.mark.parametrize("over", [
    dict(use_im_start_end=True), dict(projector_type="mlp3x_gelu"), dict(projector_type="linear"),
    dict(model_type="llava_next", patch_merge_type="flat", image=ImageConfig(mode="anyres", pinpoints=[(28, 56)])),
])
def test_what_llava_hf_cannot_hold(over):
    with pytest.raises(ValueError, match="llava-hf format cannot hold.*original layout"):
        hf_config_dict(_config(**over))


NEXT_IMAGE = ImageConfig(mode="anyres", size=28, crop_size=28, pinpoints=[(28, 56), (56, 28), (56, 56)])
TEXT_VARIANTS = {
    "mistral_no_window": dict(model_type="mistral", num_key_value_heads=2, sliding_window=None, rms_norm_eps=1e-5),
    "mistral_window": dict(model_type="mistral", num_key_value_heads=1, sliding_window=24, eos_token_id=[2, 7]),
    "dynamic_rope": dict(max_position_embeddings=48, rope=RopeConfig(1e6, "dynamic", 2.0, 48), pad_token_id=0),
    "linear_rope_bias": dict(rope=RopeConfig(5e5, "linear", 4.0, 512), attention_bias=True, mlp_bias=True,
                             tie_word_embeddings=True, head_dim=32, bos_token_id=None, eos_token_id=None),
}


@pytest.mark.parametrize("variant", sorted(TEXT_VARIANTS))
@pytest.mark.parametrize("top", [
    dict(),
    dict(model_type="llava_next", patch_merge_type="spatial_unpad", image=NEXT_IMAGE, image_token_id=64000,
         projector_bias=False),
    dict(model_type="llava_next_video", patch_merge_type="spatial_unpad", image=NEXT_IMAGE, image_token_id=32001,
         video_token_id=32000, spatial_pool_mode="max", spatial_pool_stride=1),
    dict(vision_feature_layer=[-3, -1], vision_feature_select="full",
         image=ImageConfig(mode="crop", size=30, crop_size=28, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))),
])
def test_config_round_trips_through_both_readers(tmp_path, variant, top):
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=64064,
                max_position_embeddings=512, rope=RopeConfig(original_max_position=512))
    text = TextConfig(**{**base, **TEXT_VARIANTS[variant]})
    cfg = _config(text=text, **top)
    config = hf_config_dict(cfg, dtype=torch.bfloat16)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config_dict(cfg)))
    assert _comparable(read_checkpoint_config(tmp_path)) == cfg

    theirs = AutoConfig.from_pretrained(tmp_path)
    assert theirs.model_type == cfg.model_type and theirs.image_token_id == cfg.image_token_id
    assert theirs.vision_feature_layer == cfg.vision_feature_layer and theirs.dtype == torch.bfloat16
    assert getattr(theirs, "video_token_id", None) == cfg.video_token_id
    assert theirs.tie_word_embeddings == text.tie_word_embeddings
    tc = theirs.text_config
    for key, value in config["text_config"].items():
        if not key.startswith("rope_"):
            assert getattr(tc, key) == value, key
    assert tc.rope_parameters["rope_type"] == text.rope.kind and tc.rope_parameters["rope_theta"] == text.rope.theta
    assert tc.rope_parameters.get("factor", 1.0) == text.rope.factor
    vc = theirs.vision_config
    assert (vc.hidden_size, vc.num_hidden_layers, vc.image_size, vc.patch_size) == (32, 3, 28, 14)
