"""Converting an original checkpoint whose embedding has no "<image>" row (liuhaotian/llava-v1.5-7b keeps the
LLaMA vocabulary of 32000 and marks images with -200) to llava-hf: the embedding and LM head grow to 32064 as in
transformers' conversion, the tokenizer gains "<image>" (32000) and "<pad>" (32001), and greedy answers stay
those of the original loaded directly.
"""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import build_hf_model, save_tokenizer, text_config_dict, write_original_checkpoint
from conftest import noise_image
from parity import PROMPT
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoTokenizer

import llavakit
from llavakit.cli import main
from llavakit.config import ORIGINAL_IMAGE_TOKEN_ID

IMAGE = noise_image(60, 40)
LLAMA_VOCAB = 32000
EMBED = "language_model.model.embed_tokens.weight"
HEAD = "language_model.lm_head.weight"


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """An original LLaVA-1.5-style checkpoint with a 32000-row embedding and the bare LLaMA tokenizer."""
    root = tmp_path_factory.mktemp("orig32000")
    hf = build_hf_model("llava", text=text_config_dict(vocab_size=LLAMA_VOCAB, pad_token_id=0), seed=11)
    d = write_original_checkpoint(hf, root / "llava-v1.5-tiny", root / "clip-tower")
    save_tokenizer(d, extra_tokens=())
    return d, root / "clip-tower"


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory):
    src, tower = original
    out = tmp_path_factory.mktemp("hf32064") / "hf"
    assert main(["convert", "--model", str(src), "--vision-tower", str(tower), "--out", str(out),
                 "--layout", "llava-hf"]) == 0
    return out


def test_embedding_and_head_grow_to_32064_with_mean_rows(original, converted):
    src, _ = original
    source = _tensors(src / "model.safetensors")
    written = _tensors(converted / "model.safetensors")
    for ours, theirs in ((EMBED, "model.embed_tokens.weight"), (HEAD, "lm_head.weight")):
        old = source[theirs]
        assert written[ours].shape == (32064, old.shape[1])
        assert torch.equal(written[ours][:LLAMA_VOCAB], old)
        mean = old.mean(dim=0)
        assert torch.equal(written[ours][LLAMA_VOCAB:], mean.expand(64, -1))
    assert not torch.equal(written[EMBED][LLAMA_VOCAB], written[HEAD][LLAMA_VOCAB])  # each its own mean


def test_config_and_tokenizer_match_transformers_conversion(converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["image_token_index"] == 32000 and cfg["text_config"]["vocab_size"] == 32064
    assert cfg["text_config"]["pad_token_id"] == 32001
    tok = AutoTokenizer.from_pretrained(converted)
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001] and tok.pad_token == "<pad>"
    assert 32000 in tok("a <image> b").input_ids


def test_greedy_tokens_equal_the_original_in_llavakit_and_transformers(original, converted):
    src, tower = original
    direct = llavakit.load(src, dtype="float32", device="cpu", vision_tower=tower)
    assert direct.model.language_model.embed_tokens.weight.shape[0] == LLAMA_VOCAB
    assert ORIGINAL_IMAGE_TOKEN_ID in direct.tokenize(PROMPT, [IMAGE])
    want = direct.generate(PROMPT, images=[IMAGE], max_new_tokens=12, temperature=0).token_ids
    assert len(want) == 12

    pipe = llavakit.load(converted, dtype="float32", device="cpu")
    assert pipe.generate(PROMPT, images=[IMAGE], max_new_tokens=12, temperature=0).token_ids == want

    prepared = pipe.processor.prepare_images([IMAGE])
    ids = pipe.processor.tokenize(pipe.processor.render_prompt(PROMPT, 1), prepared)
    assert 32000 in ids
    ref, info = AutoModelForImageTextToText.from_pretrained(converted, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    t = torch.tensor([ids])
    with torch.no_grad():
        tokens = ref.eval().generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=12,
                                     pixel_values=prepared[0].pixel_values, do_sample=False)[0, len(ids):].tolist()
    assert tokens == want


def test_a_quantized_lm_head_grows_too(original, tmp_path):
    src, tower = original
    out = tmp_path / "w8"
    assert main(["convert", "--model", str(src), "--vision-tower", str(tower), "--out", str(out),
                 "--layout", "llava-hf", "--quantization", "w8a16", "--quantize-lm-head"]) == 0
    written = _tensors(out / "model.safetensors")
    assert written["language_model.lm_head.weight_packed"].shape[0] == 32064
    assert written["language_model.lm_head.weight_shape"].tolist() == [32064, 64]
    pipe = llavakit.load(out, dtype="float32", device="cpu")
    head = pipe.model.lm_head.dequantized_weight()
    assert head.shape == (32064, 64)
    torch.testing.assert_close(head[LLAMA_VOCAB:], head[:LLAMA_VOCAB].mean(0).expand(64, -1), atol=2e-3, rtol=0)
    assert len(pipe.generate(PROMPT, images=[IMAGE], max_new_tokens=4, temperature=0).token_ids) == 4
