"""A LoRA training result used the transformers + peft way (base, then the trained projector, then the
adapter) gives the logits of llavakit's own merge of it."""

from __future__ import annotations

import json

import torch
from checkpoints import build_hf_model, processor_config, write_hf_checkpoint
from conftest import noise_image
from safetensors.torch import load_file

import llavakit
from llavakit.train.config import make_config
from llavakit.train.lora import NON_LORA_FILE, save_adapter
from llavakit.train.merge import merge_lora_checkpoint
from llavakit.train.recipe import cleanup, setup, train_loop

R, ALPHA = 4, 8


def _data(root):
    rows = []
    for i in range(4):
        noise_image(30 + i, 20 + i, seed=i).save(root / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "conversations": [["<image>\nWhat is it?", f"Shape {i}."]]})
    (root / "data.json").write_text(json.dumps(rows))
    return root / "data.json"


def _trained_adapter(base, tmp_path):
    """Two LoRA steps with the projector training, saved as the trainer saves an adapter."""
    cfg = make_config(stage="lora", model=str(base), data_path=str(_data(tmp_path)), image_folder=str(tmp_path),
                      output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=2,
                      learning_rate=1e-2, lora_r=R, lora_alpha=ALPHA, seed=0)
    run = setup(cfg)
    try:
        train_loop(run, [])
    finally:
        cleanup(run)
    return save_adapter(run.model, tmp_path / "adapter", str(base), r=R, alpha=ALPHA, dropout=cfg.lora_dropout)


def test_transformers_peft_loading_matches_llavakit_merge(tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    base = write_hf_checkpoint(build_hf_model("llava", seed=5), tmp_path / "base", "hub",
                               processor=processor_config("LlavaImageProcessor", do_pad=True))
    adapter = _trained_adapter(base, tmp_path)
    merged = llavakit.load(merge_lora_checkpoint(base, adapter, tmp_path / "merged", "float32"),
                           dtype="float32", device="cpu")
    image = noise_image(33, 21, seed=9)
    ids = torch.tensor([merged.tokenize("What is it?", images=[image])])
    pixels = merged.processor.prepare_images([image])[0].pixel_values
    with torch.no_grad():
        ours = merged.model.compute_logits(merged.model(merged.model.embed_inputs(
            ids, merged.model.encode_images([pixels], [(21, 33)])), torch.arange(ids.shape[1])[None]))[0, -1]

    trained = load_file(adapter / NON_LORA_FILE)
    assert sorted(trained) == [f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("bias", "weight")]
    hf = LlavaForConditionalGeneration.from_pretrained(base).eval()
    with torch.no_grad():
        before = hf(input_ids=ids, pixel_values=pixels).logits[0, -1]
    projector = hf.model.multi_modal_projector
    assert (projector.linear_1.weight - trained["multi_modal_projector.linear_1.weight"]).abs().max() > 1e-3
    projector.load_state_dict({k.removeprefix("multi_modal_projector."): v for k, v in trained.items()})
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf, adapter).eval()(input_ids=ids, pixel_values=pixels).logits[0, -1]
    assert (ours - before).abs().max() > 1e-2  # training changed the model
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
