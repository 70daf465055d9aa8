"""The CLIP judge against open_clip itself: pixels, token ids and embeddings that open_clip 3.3.0 computed
(tests/eval/assets/make_open_clip_golden.py) for two tiny random checkpoints in open_clip's file layouts."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from llavakit.eval.clip_judge import load_judge, read_state_dict
from llavakit.eval.clip_model import ClipConfig
from llavakit.eval.clip_tokenizer import ClipTokenizer, read_open_clip_vocab
from llavakit.processing.image import load_image

ASSETS = Path(__file__).parent / "assets" / "open_clip"
VOCAB = ASSETS / "bpe_tiny.txt.gz"
GOLDEN = load_file(ASSETS / "golden.safetensors")
META = json.loads((ASSETS / "golden.json").read_text(encoding="utf-8"))
CAPTIONS = META["captions"]
# Which captions open_clip cut at its 16-token context (the tiny vocabulary spends many tokens a word).
TRUNCATED = [True, False, True, True, False, False]


def _images():
    return [load_image(ASSETS / name) for name in META["images"]]


def _assert_judge_matches(judge, name: str) -> None:
    images = _images()
    assert_close(torch.stack([judge.preprocess(img) for img in images]), GOLDEN[f"{name}.pixels"], rtol=0, atol=0)
    assert_close(judge.embed_images(images), GOLDEN[f"{name}.image_emb"], rtol=0, atol=2e-6)
    text, truncated = judge.embed_texts(CAPTIONS)
    assert_close(text, GOLDEN[f"{name}.text_emb"], rtol=0, atol=2e-6)
    assert truncated == TRUNCATED


@pytest.mark.parametrize("name", ["standard", "variant"])
def test_judge_matches_open_clip(name):
    # standard: CLIP layout, safetensors, vocabulary found beside it. variant: CustomTextCLIP layout, .bin,
    # QuickGELU, layer scale, no ln_pre, average pooling, squash/bilinear resize with its own mean/std.
    judge = load_judge(ASSETS / name, tokenizer=None if name == "standard" else VOCAB)
    _assert_judge_matches(judge, name)


def test_tokenizer_matches_open_clip():
    ids, truncated = ClipTokenizer.from_file(VOCAB, context_length=16)(CAPTIONS)
    assert torch.equal(ids, GOLDEN["ids"])  # incl. ftfy's uncurled quotes, HTML entities, empty text
    assert truncated == TRUNCATED
    assert ids[truncated.index(True), -1] == ids.max()  # a cut text still ends with the end token


def test_tokenizer_from_a_hugging_face_folder_gives_the_same_ids(tmp_path):
    from transformers import CLIPTokenizer

    vocab, merges = read_open_clip_vocab(VOCAB)
    CLIPTokenizer(vocab=vocab, merges=merges, bos_token="<start_of_text>", eos_token="<end_of_text>",
                  unk_token="<end_of_text>", pad_token="<end_of_text>").save_pretrained(tmp_path)
    ids, _ = ClipTokenizer.from_file(tmp_path, context_length=16)(CAPTIONS)
    assert torch.equal(ids, GOLDEN["ids"])


def _model_cfg(name: str) -> dict:
    return json.loads((ASSETS / name / "open_clip_config.json").read_text())["model_cfg"]


@pytest.mark.parametrize("wrap", ["plain", "module", "state_dict", "text_nested"])
def test_a_weights_file_with_clip_arch_loads_every_open_clip_wrapping(tmp_path, wrap):
    state = load_file(ASSETS / "standard" / "open_clip_model.safetensors")
    text_parts = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if wrap == "module":  # saved from a DistributedDataParallel model
        state = {f"module.{k}": v for k, v in state.items()}
    if wrap == "text_nested":  # CustomTextCLIP: the text tower under "text."
        state = {f"text.{k}" if k.split(".")[0] in text_parts else k: v for k, v in state.items()}
    payload = {"epoch": 3, "state_dict": state} if wrap == "state_dict" else state
    torch.save(payload, tmp_path / "epoch_3.pt")
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(_model_cfg("standard")))
    _assert_judge_matches(load_judge(tmp_path / "epoch_3.pt", arch=str(arch), tokenizer=VOCAB), "standard")


def test_a_safetensors_file_beside_its_config(tmp_path):
    (tmp_path / "open_clip_config.json").write_text((ASSETS / "standard" / "open_clip_config.json").read_text())
    save_file(load_file(ASSETS / "standard" / "open_clip_model.safetensors"), tmp_path / "weights.safetensors")
    _assert_judge_matches(load_judge(tmp_path / "weights.safetensors", tokenizer=VOCAB), "standard")


def test_wrong_architecture_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not fit .* 240 weights missing .*; check --clip-arch"):
        load_judge(ASSETS / "standard", arch="ViT-B-32")  # built on the meta device: no 600 MB allocated
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps({**_model_cfg("standard"), "embed_dim": 12}))
    with pytest.raises(ValueError, match=r"visual.proj has shape \(16, 8\), the architecture expects \(16, 12\)"):
        load_judge(ASSETS / "standard", arch=str(arch))
    with pytest.raises(ValueError, match="unknown --clip-arch 'ViT-Q-99'; .*ViT-H-14"):
        load_judge(ASSETS / "standard", arch="ViT-Q-99")


def test_missing_checkpoint_config_and_weights_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_judge(tmp_path / "nope")
    with pytest.raises(ValueError, match="no open_clip_config.json .*--clip-arch"):
        load_judge(tmp_path)
    (tmp_path / "open_clip_config.json").write_text((ASSETS / "standard" / "open_clip_config.json").read_text())
    with pytest.raises(ValueError, match="no CLIP weights in .*open_clip_model.safetensors"):
        load_judge(tmp_path, tokenizer=VOCAB)


def test_unreadable_weights_are_a_one_line_error(tmp_path):
    (tmp_path / "open_clip_config.json").write_text((ASSETS / "standard" / "open_clip_config.json").read_text())
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read CLIP weights"):
        load_judge(tmp_path, tokenizer=VOCAB)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"visual.proj": os.getcwd}, path)  # any callable is a global weights_only=True refuses
    with pytest.raises(ValueError, match="could not read CLIP weights"):
        read_state_dict(path)


def test_no_tokenizer_anywhere_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # as if open_clip_torch were absent
    with pytest.raises(ValueError, match="no CLIP tokenizer found .*--clip-tokenizer"):
        load_judge(ASSETS / "variant")


@pytest.mark.parametrize("model_cfg, message", [
    ({"vision_cfg": {"layers": [3, 4, 6, 3]}}, "ResNet"),
    ({"text_cfg": {"hf_tokenizer_name": "bert-base-uncased"}}, "hf_tokenizer_name"),
    ({"vision_cfg": {"timm_model_name": "convnext_base"}}, "timm_model_name"),
    ({"vision_cfg": {"attentional_pool": True}}, "attentional_pool"),
    ({"text_cfg": {"pool_type": "eos"}}, "pool_type"),
])
def test_unsupported_open_clip_configs_are_refused_by_name(model_cfg, message):
    with pytest.raises(ValueError, match=message):
        ClipConfig.from_open_clip({"embed_dim": 8, **model_cfg})
