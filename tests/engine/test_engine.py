"""The engine against the plain generate loop and transformers: mixed batches, AnyRes images, chunked
prefill, preemption, prefix caching, per-request sampling, streaming and abort."""

from __future__ import annotations

import asyncio

import pytest
import torch
from checkpoints import PINPOINTS, build_hf_model, processor_config, text_config_dict, write_hf_checkpoint
from conftest import noise_image
from engine_runs import engine_for, run
from parity import hf_processor

import llavakit
from llavakit.config import EngineConfig
from llavakit.engine.async_engine import AsyncLLMEngine
from llavakit.llm import LLM
from llavakit.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = build_hf_model("llava_next", text=text_config_dict(num_key_value_heads=2), seed=11)
    d = write_hf_checkpoint(hf, tmp_path_factory.mktemp("eng") / "ck", "hub",
                            processor=processor_config("LlavaNextImageProcessor", image_grid_pinpoints=PINPOINTS))
    return hf, d, llavakit.load(d, dtype="float32", device="cpu")


IMAGES = [noise_image(100, 30, seed=1), noise_image(25, 90, seed=2), noise_image(9, 7, seed=3),
          noise_image(60, 60, seed=4)]
PROMPTS = ["What is this?", "Describe the picture in detail please.", "Colour?", "Is it big or small, and why?"]


def requests():
    reqs = [{"prompt": p, "images": [im]} for p, im in zip(PROMPTS, IMAGES, strict=True)]
    reqs.append({"prompt": "No image here, just text."})
    reqs.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                              {"role": "user", "content": "Which one?"}], "images": [IMAGES[0]]})
    return reqs


def reference(pipe, req, **kw):
    if "messages" in req:
        return pipe.chat(req["messages"], images=req.get("images"), **kw)
    return pipe.generate(req["prompt"], images=req.get("images"), **kw)


GREEDY = [SamplingParams(max_tokens=n) for n in (12, 5, 20, 9, 15, 7)]


@pytest.mark.parametrize("cfg", [
    EngineConfig(num_kv_blocks=256),
    EngineConfig(num_kv_blocks=256, max_num_batched_tokens=16),  # chunked prefill: every prompt in pieces
    EngineConfig(num_kv_blocks=40, block_size=8),  # too small for all at once: preemption by recompute
    EngineConfig(num_kv_blocks=256, enable_prefix_caching=False, enable_chunked_prefill=False),
], ids=["roomy", "chunked", "preempting", "plain"])
def test_mixed_batch_equals_the_plain_loop(tiny, cfg):
    _, _, pipe = tiny
    engine = engine_for(pipe, cfg)
    outs = run(engine, pipe, requests(), GREEDY)
    for req, p, out in zip(requests(), GREEDY, outs, strict=True):
        ref = reference(pipe, req, max_new_tokens=p.max_tokens)
        assert out.token_ids == ref.token_ids and out.text == ref.text
        assert out.prompt_token_ids == ref.prompt_token_ids
    assert engine.block_manager.num_free_blocks == cfg.num_kv_blocks  # nothing leaked


@pytest.mark.parametrize("cfg", [
    EngineConfig(num_kv_blocks=256, max_num_seqs=5),
    EngineConfig(num_kv_blocks=40, block_size=8, max_num_seqs=5),  # preemption
], ids=["roomy", "preempting"])
def test_static_decode_buffers_equal_the_plain_loop(tiny, cfg):
    """The CUDA-graph step (padded buckets, trash-block padding rows, static buffers) run eagerly on the CPU."""
    _, _, pipe = tiny
    engine = engine_for(pipe, cfg)
    engine.runner.graphs = engine.runner.decode_graphs(engine.max_model_len, capture=False)
    assert engine.runner.graphs.buckets == [1, 2, 4, 5]
    outs = run(engine, pipe, requests(), GREEDY)
    for req, p, out in zip(requests(), GREEDY, outs, strict=True):
        assert out.token_ids == reference(pipe, req, max_new_tokens=p.max_tokens).token_ids
    assert engine.runner.graphs.steps >= 10  # the pure-decode steps went through the buffers
    assert engine.block_manager.num_free_blocks == cfg.num_kv_blocks


def test_triton_backend_in_the_engine_interpreted(tiny, interpreted_triton):
    """The engine on the Triton kernel (CPU interpreter) through the static decode buffers."""
    _, _, pipe = tiny
    engine = engine_for(pipe, EngineConfig(num_kv_blocks=256, max_num_seqs=5, attention_backend="triton"))
    engine.runner.graphs = engine.runner.decode_graphs(engine.max_model_len, capture=False)
    outs = run(engine, pipe, requests(), GREEDY)
    for req, p, out in zip(requests(), GREEDY, outs, strict=True):
        assert out.token_ids == reference(pipe, req, max_new_tokens=p.max_tokens).token_ids


def test_equals_transformers(tiny):
    hf, d, pipe = tiny
    engine = engine_for(pipe, EngineConfig(num_kv_blocks=256))
    reqs = [{"prompt": p, "images": [im]} for p, im in zip(PROMPTS[:3], IMAGES[:3], strict=True)]
    outs = run(engine, pipe, reqs, SamplingParams(max_tokens=20, ignore_eos=True))
    proc = hf_processor("llava_next", d)
    for req, out in zip(reqs, outs, strict=True):
        inputs = proc(images=req["images"], text=pipe.processor.render_prompt(req["prompt"], 1), return_tensors="pt")
        with torch.no_grad():
            ref = hf.generate(**inputs, max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert out.token_ids == ref[0, inputs["input_ids"].shape[1]:].tolist()


def test_prefix_cache_reuses_blocks_and_skips_the_tower(tiny):
    _, _, pipe = tiny
    engine = engine_for(pipe, EngineConfig(num_kv_blocks=256, block_size=8))
    first = run(engine, pipe, [{"prompt": PROMPTS[0], "images": [IMAGES[0]]}], SamplingParams(max_tokens=6))[0]
    encoded = engine.runner.images_encoded
    again = run(engine, pipe, [{"prompt": PROMPTS[0], "images": [IMAGES[0]]}], SamplingParams(max_tokens=6))[0]
    assert again.token_ids == first.token_ids and again.num_cached_tokens > 0
    assert engine.runner.images_encoded == encoded  # the repeated image was not encoded again
    other = run(engine, pipe, [{"prompt": PROMPTS[0], "images": [noise_image(100, 30, seed=99)]}],
                SamplingParams(max_tokens=6))[0]
    ref = pipe.generate(PROMPTS[0], images=[noise_image(100, 30, seed=99)], max_new_tokens=6)
    assert other.token_ids == ref.token_ids  # same placeholder ids, other image: no collision


def test_a_repeated_image_in_one_batch_is_encoded_once(tiny):
    _, _, pipe = tiny
    engine = engine_for(pipe, EngineConfig(num_kv_blocks=256, enable_prefix_caching=False))
    run(engine, pipe, [{"prompt": p, "images": [IMAGES[1]]} for p in PROMPTS], SamplingParams(max_tokens=3))
    assert engine.runner.images_encoded == 1


def test_seeded_sampling_does_not_depend_on_the_batch(tiny):
    _, _, pipe = tiny
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    alone = run(engine_for(pipe, EngineConfig(num_kv_blocks=256)), pipe, [requests()[0]], seeded)[0]
    mixed = run(engine_for(pipe, EngineConfig(num_kv_blocks=256)), pipe, requests(),
                [seeded] + [SamplingParams(max_tokens=8, temperature=0.8, seed=i) for i in range(5)])[0]
    assert alone.token_ids == mixed.token_ids


def test_n_completions_stop_strings_and_logprobs(tiny):
    _, _, pipe = tiny
    engine = engine_for(pipe, EngineConfig(num_kv_blocks=256))
    out = run(engine, pipe, [requests()[0]], SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=1, logprobs=2))[0]
    assert len(out.outputs) == 3 and len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert all(len(o.logprobs) == len(o.token_ids) for o in out.outputs)
    full = reference(pipe, requests()[0], max_new_tokens=12)
    needle = full.text[len(full.text) // 2:][:3]
    stopped = run(engine_for(pipe, EngineConfig(num_kv_blocks=256)), pipe, [requests()[0]],
                  SamplingParams(max_tokens=12, stop=[needle]))[0]
    assert stopped.outputs[0].finish_reason == "stop" and stopped.text == full.text[:full.text.index(needle)]


def test_llm_api(tiny):
    _, d, pipe = tiny
    llm = LLM(str(d), dtype="float32", device="cpu", num_kv_blocks=128)
    outs = llm.generate(requests()[:3], SamplingParams(max_tokens=6), use_tqdm=False)
    assert [o.text for o in outs] == [reference(pipe, r, max_new_tokens=6).text for r in requests()[:3]]


def test_llm_settings_are_checked_against_the_engine_config_and_load(tiny):
    _, d, _ = tiny
    with pytest.raises(TypeError, match="unknown keyword.*max_num_seq\\b.*engine settings are .*max_num_seqs"):
        LLM(str(d), dtype="float32", device="cpu", max_num_seq=4)  # a typo is an error, not ignored
    llm = LLM(str(d), dtype="float32", device="cpu", num_kv_blocks=64, max_num_seqs=3, enable_prefix_caching=False,
              enforce_eager=True, conv_mode="vicuna_v1")
    cfg = llm.engine.cfg
    assert (cfg.num_kv_blocks, cfg.max_num_seqs, cfg.enable_prefix_caching, cfg.cuda_graphs) == (64, 3, False, False)
    assert llm.processor.template.name == "vicuna_v1"


def test_llm_refuses_a_request_dict_it_cannot_read(tiny):
    _, _, pipe = tiny
    with pytest.raises(ValueError, match="exactly one of prompt, messages, prompt_token_ids"):
        pipe.processor.request_inputs({"prompt": "hi", "messages": []})
    with pytest.raises(ValueError, match="got image, prompt"):
        pipe.processor.request_inputs({"prompt": "hi", "image": IMAGES[0]})  # "images" is the key


def test_async_engine_streams_and_aborts(tiny):
    _, _, pipe = tiny
    engine = AsyncLLMEngine(engine_for(pipe, EngineConfig(num_kv_blocks=64)))

    async def main():
        pieces = []
        first, second = (pipe.processor.request_inputs(r) for r in requests()[:2])
        async for out in engine.generate(first, SamplingParams(max_tokens=10), "a"):
            pieces.append(out.text)
        stream = engine.generate(second, SamplingParams(max_tokens=200, ignore_eos=True), "b")
        async for out in stream:
            if len(out.token_ids) >= 2:
                break
        await stream.aclose()
        return pieces

    try:
        pieces = asyncio.run(main())
    finally:
        engine.shutdown()
    assert pieces[-1] == reference(pipe, requests()[0], max_new_tokens=10).text
    assert all(pieces[-1].startswith(p) for p in pieces)
    assert engine.engine.block_manager.num_free_blocks == 64 and not engine.engine.has_unfinished()
