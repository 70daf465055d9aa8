"""Parity helpers: run llavakit and transformers on the same checkpoint, inputs and prompt."""

from __future__ import annotations

import torch
from checkpoints import PINPOINTS, TILE
from transformers import AutoTokenizer, LlavaNextProcessor, LlavaProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

PROMPT = "What is shown in this picture?"
SIZE = dict(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE})


def hf_processor(kind: str, tokenizer_dir, pad: bool = True, select: str = "default"):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(tokenizer=tok, patch_size=14, vision_feature_select_strategy=select, num_additional_image_tokens=1)
    if kind == "llava":
        return LlavaProcessor(image_processor=LlavaImageProcessorPil(do_pad=pad, **SIZE), **common)
    return LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(image_grid_pinpoints=PINPOINTS, **SIZE),
                              **common)


def our_last_logits(pipe, ids, prepared) -> torch.Tensor:
    model = pipe.model
    with torch.inference_mode():
        feats = (model.encode_images([p.pixel_values for p in prepared], [p.size for p in prepared])
                 if prepared else None)
        hidden = model(model.embed_inputs(torch.tensor([ids]), feats), torch.arange(len(ids))[None])
        return model.compute_logits(hidden[0, -1])


def assert_parity(pipe, hf_model, processor, images, prompt: str = PROMPT, hf_inputs=None, check_ids=True):
    """The four acceptance checks for one prompt with `images`."""
    text = pipe.processor.render_prompt(prompt, len(images))
    prepared = pipe.processor.prepare_images(images)
    ids = pipe.processor.tokenize(text, prepared)
    if hf_inputs is None:
        hf_inputs = processor(images=images or None, text=text, return_tensors="pt")
    if check_ids:
        assert hf_inputs["input_ids"][0].tolist() == ids
    if images:
        ref_pix = hf_inputs["pixel_values"]
        for i, p in enumerate(prepared):
            ref = ref_pix[i][: p.pixel_values.shape[0]] if ref_pix.dim() == 5 else ref_pix[i : i + 1]
            torch.testing.assert_close(p.pixel_values, ref, atol=1e-5, rtol=0)
    with torch.no_grad():
        ref_logits = hf_model(**hf_inputs).logits[0, -1]
    torch.testing.assert_close(our_last_logits(pipe, ids, prepared), ref_logits, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        ref_tokens = hf_model.generate(**hf_inputs, max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    out = pipe.generate(prompt, images=images, max_new_tokens=20)
    assert out.prompt_token_ids == ids
    assert out.token_ids == ref_tokens
    return ids
