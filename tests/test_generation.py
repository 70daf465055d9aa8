"""The generation loop: sampling controls, stops, streaming, multi-turn chat, limits."""

from __future__ import annotations

import pytest
import torch
from checkpoints import build_hf_model, processor_config, save_tokenizer, write_hf_checkpoint, write_original_checkpoint
from conftest import noise_image
from parity import hf_processor

import llavakit
from llavakit.layers.sampler import filter_top_k_top_p

PROMPT = "What is in the image?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = build_hf_model("llava", seed=7)
    d = write_hf_checkpoint(hf, tmp_path_factory.mktemp("gen") / "ck", "hub",
                            processor=processor_config("LlavaImageProcessor", do_pad=True))
    return hf, d, llavakit.load(d, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def image():
    return noise_image(48, 32, seed=11)


def test_repetition_penalty_matches_transformers(tmp_path, image):
    """A model whose head is its embedding repeats the last token; the penalty must break that."""
    hf = build_hf_model("llava", seed=8)
    with torch.no_grad():
        hf.lm_head.weight.copy_(hf.model.language_model.embed_tokens.weight * 20)
    d = write_hf_checkpoint(hf, tmp_path / "rep", "hub", processor=processor_config("LlavaImageProcessor", do_pad=True))
    pipe = llavakit.load(d, dtype="float32", device="cpu")
    plain = pipe.generate(PROMPT, images=[image], max_new_tokens=16).token_ids
    assert len(set(plain)) < 4  # it does repeat
    text = pipe.processor.render_prompt(PROMPT, 1)
    inputs = hf_processor("llava", d)(images=[image], text=text, return_tensors="pt")
    with torch.no_grad():
        ref = hf.generate(**inputs, max_new_tokens=16, do_sample=False, repetition_penalty=1.5)
    out = pipe.generate(PROMPT, images=[image], max_new_tokens=16, repetition_penalty=1.5)
    assert out.token_ids == ref[0, inputs["input_ids"].shape[1]:].tolist()
    assert out.token_ids != plain  # the penalised prompt token is no longer chosen


def test_seeded_sampling_is_reproducible(tiny, image):
    _, _, pipe = tiny
    a = pipe.generate(PROMPT, images=[image], max_new_tokens=12, temperature=1.0, seed=3)
    b = pipe.generate(PROMPT, images=[image], max_new_tokens=12, temperature=1.0, seed=3)
    c = pipe.generate(PROMPT, images=[image], max_new_tokens=12, temperature=1.0, seed=4)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_1_and_tiny_top_p_are_greedy(tiny, image):
    _, _, pipe = tiny
    greedy = pipe.generate(PROMPT, images=[image], max_new_tokens=10).token_ids
    sampled = dict(max_new_tokens=10, temperature=1.5, seed=0)
    assert pipe.generate(PROMPT, images=[image], top_k=1, **sampled).token_ids == greedy
    assert pipe.generate(PROMPT, images=[image], top_p=1e-6, **sampled).token_ids == greedy


def test_filter_top_k_top_p_values():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    kept = filter_top_k_top_p(logits, top_k=0, top_p=0.7).isfinite().tolist()
    assert kept == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.25 >= 0.7
    kept = filter_top_k_top_p(logits, top_k=3, top_p=1.0).isfinite().tolist()
    assert kept == [True, True, True, False]


def test_length_stop_strings_and_stop_ids(tiny, image):
    _, _, pipe = tiny
    full = pipe.generate(PROMPT, images=[image], max_new_tokens=12)
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    stop_id = full.token_ids[4]
    cut = pipe.generate(PROMPT, images=[image], max_new_tokens=12, stop_token_ids=[stop_id])
    first = full.token_ids.index(stop_id)
    assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids[:first + 1]
    needle = full.text.strip()[len(full.text.strip()) // 2:][:3]
    stopped = pipe.generate(PROMPT, images=[image], max_new_tokens=12, stop=[needle])
    assert stopped.finish_reason == "stop" and needle not in stopped.text
    assert full.text.startswith(stopped.text) and stopped.text == full.text[:full.text.index(needle)]


@pytest.mark.parametrize("asked", [{"n": 2}, {"logprobs": 1}])
def test_pipeline_refuses_what_only_the_engine_does(tiny, image, asked):
    with pytest.raises(ValueError, match="Pipeline answers once.*llavakit.LLM"):
        tiny[2].generate("What is it?", images=[image], **asked)


def test_stream_yields_the_generated_text(tiny, image):
    _, _, pipe = tiny
    pieces = list(pipe.stream(PROMPT, images=[image], max_new_tokens=15))
    assert len(pieces) > 1
    assert "".join(pieces) == pipe.generate(PROMPT, images=[image], max_new_tokens=15).text


def test_chat_renders_history_and_answers_the_last_turn(tiny, image):
    _, _, pipe = tiny
    first = pipe.generate(PROMPT, images=[image], max_new_tokens=6)
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": first.text},
                {"role": "user", "content": "And the colors?"}]
    out = pipe.chat(messages, images=[image], max_new_tokens=6)
    rendered = pipe.processor.render_messages(messages, 1)
    assert rendered.count("USER:") == 2 and f"ASSISTANT: {first.text}</s>USER: And the colors? ASSISTANT:" in rendered
    raw = pipe.generate(rendered, images=[image], conv_mode="raw", max_new_tokens=6)
    assert out.prompt_token_ids == raw.prompt_token_ids and out.token_ids == raw.token_ids


def test_conv_mode_override(tiny):
    _, _, pipe = tiny
    ids = pipe.tokenize("hi", conv_mode="llava_v0")
    assert "###Human: hi###Assistant:" in pipe.tokenizer.decode(ids)


def test_prompt_longer_than_context_is_refused(tiny, image):
    _, _, pipe = tiny
    with pytest.raises(ValueError, match=r"the prompt is \d+ tokens but the model's context is 512"):
        pipe.generate("word " * 600, images=[image])


def test_walkthrough_prompt_tokenizes_like_the_original(tmp_path):
    """The LLaVA-NeXT walk-through's example: llava_v1 template, LLaMA tokenizer, -200 where the image goes."""
    hf = build_hf_model("llava")
    d = write_original_checkpoint(hf, tmp_path / "ck", tmp_path / "tower")
    save_tokenizer(d, extra_tokens=())
    pipe = llavakit.load(d, dtype="float32", device="cpu", vision_tower=tmp_path / "tower")
    ids = pipe.tokenize("What are the things I should be cautious about when I visit here?",
                        images=[noise_image(30, 30)], conv_mode="llava_v1")
    collapsed = [i for k, i in enumerate(ids) if not (i == -200 and ids[k - 1] == -200)]
    assert collapsed == [1, 319, 13563, 1546, 263, 12758, 5199, 322, 385, 23116, 21082, 20255, 29889, 450, 20255,
                         4076, 8444, 29892, 13173, 29892, 322, 1248, 568, 6089, 304, 278, 5199, 29915, 29879, 5155,
                         29889, 3148, 1001, 29901, 29871, -200, 29871, 13, 5618, 526, 278, 2712, 306, 881, 367, 274,
                         1300, 2738, 1048, 746, 306, 6493, 1244, 29973, 319, 1799, 9047, 13566, 29901]
    assert ids.count(-200) == 4
