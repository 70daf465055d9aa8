"""Original LLaVA layout (liuhaotian/*, LLaVAR): flat config with mm_* keys, a vision tower that may live
in its own CLIP directory, -200 image placeholders, and the linear + im_start/im_end variant."""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
import torch
import transformers
from checkpoints import (
    IMAGE_TOKEN_ID,
    PINPOINTS,
    build_hf_model,
    save_tokenizer,
    text_config_dict,
    write_clip_tower,
    write_original_checkpoint,
)
from conftest import noise_image
from parity import SIZE, assert_parity, our_last_logits
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

import llavakit
from llavakit.config import ORIGINAL_IMAGE_TOKEN_ID, ConfigError
from llavakit.weights.files import WeightsError


def _hf_inputs(ids, pixel_values, image_sizes=None):
    """transformers wants its own image token id where the original puts -200."""
    t = torch.tensor([[IMAGE_TOKEN_ID if i == ORIGINAL_IMAGE_TOKEN_ID else i for i in ids]])
    d = {"input_ids": t, "attention_mask": torch.ones_like(t), "pixel_values": pixel_values}
    if image_sizes is not None:
        d["image_sizes"] = image_sizes
    return d


def _ours(pipe, images, prompt="Describe the image."):
    text = pipe.processor.render_prompt(prompt, len(images))
    prepared = pipe.processor.prepare_images(images)
    return pipe.processor.tokenize(text, prepared), prepared


@pytest.fixture(scope="module")
def llava15_original(tmp_path_factory):
    root = tmp_path_factory.mktemp("orig15")
    hf = build_hf_model("llava", seed=2)
    d = write_original_checkpoint(hf, root / "llava-v1.5-tiny", root / "clip-tower")
    save_tokenizer(d, extra_tokens=())
    return hf, d, root / "clip-tower"


def test_original_llava15_with_separate_clip_tower(llava15_original):
    hf, d, tower = llava15_original
    pipe = llavakit.load(d, dtype="float32", device="cpu", vision_tower=tower)
    assert pipe.config.layout == "original" and pipe.config.image.mode == "pad"
    assert pipe.template.name == "vicuna_v1"
    image = noise_image(64, 36)
    ids, _ = _ours(pipe, [image])
    assert ids.count(ORIGINAL_IMAGE_TOKEN_ID) == 4
    pixels = LlavaImageProcessorPil(do_pad=True, **SIZE)(image, return_tensors="pt").pixel_values
    assert_parity(pipe, hf, None, [image], prompt="Describe the image.", hf_inputs=_hf_inputs(ids, pixels),
                  check_ids=False)


def test_original_tower_found_in_hf_cache(llava15_original, tmp_path, monkeypatch):
    hf, d, tower = llava15_original
    snap = tmp_path / "hub" / "models--openai--clip-vit-tiny-test" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    snap.symlink_to(tower, target_is_directory=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    pipe = llavakit.load(d, dtype="float32", device="cpu")
    assert pipe.config.vision_tower_dir == str(snap)


def test_original_tower_missing_names_the_repo(llava15_original, tmp_path, monkeypatch):
    _, d, _ = llava15_original
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"openai/clip-vit-tiny-test.*--vision-tower"):
        llavakit.load(d, dtype="float32", device="cpu")


def test_original_known_tower_missing_weights_names_the_repo(llava15_original, tmp_path, monkeypatch):
    """A known tower name gives the config, but the weights must still come from somewhere."""
    _, d, _ = llava15_original
    cfg = json.loads((d / "config.json").read_text())
    ck = tmp_path / "ck"
    ck.mkdir()
    for f in d.iterdir():
        (ck / f.name).write_bytes(f.read_bytes())
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (ck / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises((WeightsError, ConfigError), match="openai/clip-vit-large-patch14-336"):
        llavakit.load(ck, dtype="float32", device="cpu")


def test_original_llava16_anyres_prefers_its_own_finetuned_tower(tmp_path):
    text = text_config_dict(num_key_value_heads=2)
    hf = build_hf_model("llava_next", text=text, seed=4)
    other = build_hf_model("llava_next", text=text, seed=5)  # a different tower in the CLIP directory
    d = write_original_checkpoint(hf, tmp_path / "llava-v1.6-tiny", None, aspect="anyres",
                                  extra_config={"image_grid_pinpoints": PINPOINTS,
                                                "mm_patch_merge_type": "spatial_unpad"})
    write_clip_tower(other, tmp_path / "tower")
    save_tokenizer(d, extra_tokens=())
    pipe = llavakit.load(d, dtype="float32", device="cpu", vision_tower=tmp_path / "tower")
    assert pipe.config.image.mode == "anyres" and pipe.config.patch_merge_type == "spatial_unpad"
    image = noise_image(90, 40)
    ids, prepared = _ours(pipe, [image])
    proc = LlavaNextImageProcessorPil(image_grid_pinpoints=PINPOINTS, **SIZE)(image, return_tensors="pt")
    assert_parity(pipe, hf, None, [image], prompt="Describe the image.",
                  hf_inputs=_hf_inputs(ids, proc.pixel_values, proc.image_sizes), check_ids=False)


def test_llavar_linear_projector_with_im_start_end(tmp_path):
    """LLaVAR: `linear` projector, <im_start><image><im_end>; transformers has no such model, so the
    reference is assembled from its CLIP and LLaMA models the way the original LLaVA code does."""
    hf = build_hf_model("llava", seed=6)
    d = write_original_checkpoint(hf, tmp_path / "llavar", tmp_path / "tower", projector="linear",
                                  aspect="square", im_start_end=True)
    save_tokenizer(d, extra_tokens=("<im_patch>", "<im_start>", "<im_end>"))
    pipe = llavakit.load(d, dtype="float32", device="cpu", vision_tower=tmp_path / "tower")
    assert pipe.config.projector_type == "linear" and pipe.config.use_im_start_end
    image = noise_image(50, 70)
    ids, prepared = _ours(pipe, [image])
    vocab = pipe.tokenizer.get_vocab()
    first = ids.index(ORIGINAL_IMAGE_TOKEN_ID)
    assert ids[first - 1] == vocab["<im_start>"] and ids[first + 4] == vocab["<im_end>"]

    ref_embeds = _llavar_reference_embeds(hf, ids, image)
    lm = transformers.LlamaForCausalLM(hf.config.text_config).eval()
    lm.model.load_state_dict(hf.model.language_model.state_dict())
    lm.lm_head.load_state_dict(hf.lm_head.state_dict())
    with torch.no_grad():
        ref_logits = lm(inputs_embeds=ref_embeds).logits[0, -1]
        ref_tokens = lm.generate(inputs_embeds=ref_embeds, max_new_tokens=20, do_sample=False)[0].tolist()
    torch.testing.assert_close(our_last_logits(pipe, ids, prepared), ref_logits, atol=1e-4, rtol=1e-4)
    assert pipe.generate("Describe the image.", images=[image], max_new_tokens=20).token_ids == ref_tokens


def _llavar_reference_embeds(hf, ids, image):
    pixels = transformers.CLIPImageProcessor(**SIZE)(image, return_tensors="pt").pixel_values
    clip = transformers.CLIPVisionModel(hf.config.vision_config).eval()
    clip.load_state_dict(hf.model.vision_tower.state_dict())
    with torch.no_grad():
        feats = clip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = hf.model.multi_modal_projector.linear_1(feats)[0]
        pos = ids.index(ORIGINAL_IMAGE_TOKEN_ID)
        text = [i for i in ids if i != ORIGINAL_IMAGE_TOKEN_ID]
        emb = hf.model.language_model.embed_tokens(torch.tensor(text))
        return torch.cat([emb[:pos], feats, emb[pos:]])[None]
