"""`llavakit convert` between layouts, and the original-layout writer.

original -> llava-hf -> original must give back the source's tensors bit for bit and the config keys the
loader reads; the llava-hf step must give transformers' logits. A model whose tower is a known CLIP is
written with the tower inside (LLaVA-1.6 style) and loads with no flag.
"""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import build_hf_model, save_tokenizer, write_hf_checkpoint, write_original_checkpoint
from conftest import noise_image
from parity import PROMPT, our_last_logits
from safetensors import safe_open
from transformers import AutoModelForImageTextToText
from videos import next_video_checkpoint

import llavakit
from llavakit import config as config_module
from llavakit.cli import main
from llavakit.config import ORIGINAL_IMAGE_TOKEN_ID

IMAGE = noise_image(60, 40)
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                  patch_size=14)
# What checkpoint_config reads from an original config.json (the rest is transformers bookkeeping).
ORIGINAL_KEYS = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
                 "eos_token_id", "tie_word_embeddings", "rope_theta", "mm_vision_tower", "mm_hidden_size",
                 "mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature", "mm_use_im_start_end",
                 "image_aspect_ratio", "mm_patch_merge_type")


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def _convert(*argv) -> int:
    return main(["convert", *map(str, argv)])


def _logits(pipe):
    prepared = pipe.processor.prepare_images([IMAGE])
    ids = pipe.processor.tokenize(pipe.processor.render_prompt(PROMPT, 1), prepared)
    return ids, prepared, our_last_logits(pipe, ids, prepared)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """An original LLaVA-1.5-style checkpoint (tower in a separate CLIP directory) and its transformers twin."""
    root = tmp_path_factory.mktemp("orig")
    hf = build_hf_model("llava", seed=7)
    d = write_original_checkpoint(hf, root / "llava-v1.5-tiny", root / "clip-tower")
    save_tokenizer(d, extra_tokens=())
    return hf, d, root / "clip-tower"


def test_original_to_llava_hf_and_back_is_bit_exact(original, tmp_path):
    hf, src, tower = original
    assert _convert("--model", src, "--vision-tower", tower, "--out", tmp_path / "hf", "--layout", "llava-hf") == 0
    assert _convert("--model", tmp_path / "hf", "--out", tmp_path / "back", "--layout", "original") == 0

    source, back = _tensors(src / "model.safetensors"), _tensors(tmp_path / "back" / "model.safetensors")
    assert back.keys() == source.keys()
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in source.items())
    clip = {k: v for k, v in _tensors(tower / "model.safetensors").items() if k.startswith("vision_model.")}
    written = _tensors(tmp_path / "back" / "vision_tower" / "model.safetensors")
    assert written.keys() == clip.keys() and all(torch.equal(written[k], v) for k, v in clip.items())
    src_cfg, back_cfg = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "back"))
    assert {k: back_cfg[k] for k in ORIGINAL_KEYS if k != "mm_vision_tower"} == \
           {k: src_cfg[k] for k in ORIGINAL_KEYS if k != "mm_vision_tower"}
    assert back_cfg["mm_vision_tower"] == str((tmp_path / "back" / "vision_tower").resolve())

    first = llavakit.load(src, dtype="float32", device="cpu", vision_tower=tower)
    again = llavakit.load(tmp_path / "back", dtype="float32", device="cpu")  # the tower is found by its path
    assert again.config.layout == "original" and again.config.image == first.config.image
    ids, _, ours = _logits(first)
    assert _logits(again)[0] == ids and ORIGINAL_IMAGE_TOKEN_ID in ids
    torch.testing.assert_close(_logits(again)[2], ours, rtol=0, atol=1e-6)


def test_converted_llava_hf_gives_transformers_logits(original, tmp_path):
    hf, src, tower = original
    assert _convert("--model", src, "--vision-tower", tower, "--out", tmp_path / "hf", "--layout", "llava-hf") == 0
    pipe = llavakit.load(tmp_path / "hf", dtype="float32", device="cpu")
    token = pipe.config.image_token_id
    assert token == pipe.tokenizer.convert_tokens_to_ids("<image>") == 32000
    ids, prepared, ours = _logits(pipe)
    ref = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    t = torch.tensor([ids])
    with torch.no_grad():
        theirs = ref(input_ids=t, attention_mask=torch.ones_like(t), pixel_values=prepared[0].pixel_values).logits
        twin = hf(input_ids=t, attention_mask=torch.ones_like(t), pixel_values=prepared[0].pixel_values).logits
    torch.testing.assert_close(theirs[0, -1], ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs, twin, atol=0, rtol=0)


def test_known_tower_goes_inside_and_dtype_converts(tmp_path, monkeypatch):
    """A llava-hf model whose tower is a known CLIP: original layout with the tower inside (LLaVA-1.6 style),
    loadable with no flag; --dtype bfloat16 writes bfloat16."""
    monkeypatch.setitem(config_module.KNOWN_VISION_TOWERS, "openai/clip-vit-tiny-test", TINY_TOWER)
    hf = build_hf_model("llava", seed=8)
    src = write_hf_checkpoint(hf, tmp_path / "src", "hub")
    assert _convert("--model", src, "--out", tmp_path / "orig", "--layout", "original", "--dtype", "bfloat16") == 0
    cfg = json.loads((tmp_path / "orig" / "config.json").read_text())
    assert cfg["mm_vision_tower"] == "openai/clip-vit-tiny-test" and cfg["torch_dtype"] == "bfloat16"
    assert not (tmp_path / "orig" / "vision_tower").exists()
    written = _tensors(tmp_path / "orig" / "model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert "model.vision_tower.vision_tower.vision_model.post_layernorm.weight" in written  # unbuilt parts kept
    a = llavakit.load(src, dtype="bfloat16", device="cpu")
    b = llavakit.load(tmp_path / "orig", dtype="bfloat16", device="cpu")
    theirs = dict(b.model.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in a.model.named_parameters())


def test_unknown_layout_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _convert("--model", tmp_path, "--out", tmp_path / "out", "--layout", "hf")
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--group-size", "32"], "need --quantization"), (["--quantize-lm-head"], "need --quantization"),
    (["--quantization", "w4a16", "--group-size", "12"], "--group-size: quantization group size must be a positive "
                                                        "multiple of 8, got 12"),
])
def test_quantization_flag_errors_come_before_loading(tmp_path, capsys, flags, message):
    assert _convert("--model", tmp_path / "nothing-here", "--out", tmp_path / "out", *flags) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_output_and_what_the_layout_cannot_hold(tmp_path, capsys):
    _, src = next_video_checkpoint(tmp_path / "src")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert _convert("--model", src, "--out", tmp_path / "full") == 1
    assert "is not empty" in capsys.readouterr().err
    assert _convert("--model", src, "--out", tmp_path / "o", "--layout", "original") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "original LLaVA layout has no video model" in err
