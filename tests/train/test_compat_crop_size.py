"""A preprocessor that crops images to another size than the CLIP tower takes is refused before training,
in one line naming the file, both sizes and the fix; CLIP's older preprocessor files (plain-number sizes)
still read."""

from __future__ import annotations

import json
import re

import pytest
import torch
from checkpoints import TILE, build_hf_model, processor_config, save_tokenizer, write_clip_tower, write_hf_checkpoint

from llavakit.config import ConfigError
from llavakit.train.build import build_model
from llavakit.train.config import make_config
from llavakit.train.recipe import setup


def _refusal(preprocessor, crop, config) -> str:
    return (f"{preprocessor} crops images to {crop}x{crop} (crop_size) but the vision tower in {config} takes "
            f"{TILE}x{TILE} (image_size); set crop_size and size to {TILE} in preprocessor_config.json, or use "
            "the one that came with this vision tower")


def test_finetune_and_lora_refuse_a_checkpoint_whose_crop_size_is_not_the_towers(tmp_path):
    base = write_hf_checkpoint(build_hf_model("llava"), tmp_path / "base", "hub",
                               processor=processor_config("LlavaImageProcessor", do_pad=True,
                                                          crop_size={"height": 56, "width": 56}))
    (tmp_path / "data.json").write_text(json.dumps([{"conversations": [["Q", "A"]]}]))
    refusal = re.escape(_refusal(base / "preprocessor_config.json", 56, base / "config.json"))
    for stage in ("finetune", "lora"):
        cfg = make_config(stage=stage, model=str(base), data_path=str(tmp_path / "data.json"),
                          output_dir=str(tmp_path / stage), max_steps=1)
        with pytest.raises(ConfigError, match=f"^{refusal}$"):
            setup(cfg)


def test_loading_such_a_checkpoint_for_inference_is_refused_too(tmp_path):
    import llavakit

    base = write_hf_checkpoint(build_hf_model("llava"), tmp_path / "base", "hub",
                               processor=processor_config("LlavaImageProcessor", crop_size={"height": 56, "width": 56}))
    refusal = re.escape(_refusal(base / "preprocessor_config.json", 56, base / "config.json"))
    with pytest.raises(ConfigError, match=f"^{refusal}$"):
        llavakit.load(base, dtype="float32", device="cpu")


@pytest.fixture
def text_llm(tmp_path):
    import transformers

    hf = build_hf_model("llava", seed=4)
    text = {k: v for k, v in hf.config.text_config.to_dict().items() if k not in ("model_type", "architectures")}
    llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**text | {"vocab_size": 32000, "pad_token_id": None}))
    llm.save_pretrained(tmp_path / "llm")
    save_tokenizer(tmp_path / "llm", extra_tokens=())
    write_clip_tower(hf, tmp_path / "clip")
    return tmp_path / "llm", tmp_path / "clip"


def test_pretrain_refuses_a_clip_preprocessor_of_another_size_and_reads_plain_number_sizes(text_llm, tmp_path):
    llm, clip = text_llm
    preprocessor = clip / "preprocessor_config.json"
    cfg = make_config(stage="pretrain", model=str(llm), vision_tower=str(clip), data_path="unused.json")
    raw = json.loads(preprocessor.read_text())
    preprocessor.write_text(json.dumps(raw | {"crop_size": 56, "size": 56}))  # openai/clip-*'s older form
    with pytest.raises(ConfigError, match=f"^{re.escape(_refusal(preprocessor, 56, clip / 'config.json'))}$"):
        build_model(cfg, torch.device("cpu"))
    preprocessor.write_text(json.dumps(raw | {"crop_size": TILE, "size": TILE}))
    _, processor, _ = build_model(cfg, torch.device("cpu"))
    assert (processor.cfg.image.crop_size, processor.cfg.image.size) == (TILE, TILE)
