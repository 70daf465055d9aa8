"""The engine under tensor parallelism (rank 0 schedules and samples, spawned gloo workers follow): mixed
batches of image and text requests, with chunked prefill, preemption and prefix caching, give the same greedy
outputs at 2 and 4 ranks as in one process; `Pipeline.generate`/`stream` run through the engine there."""

from __future__ import annotations

import pytest
from checkpoints import PINPOINTS, build_hf_model, processor_config, text_config_dict, write_hf_checkpoint
from conftest import noise_image
from engine_runs import engine_for, run

import llavakit
from llavakit.config import EngineConfig
from llavakit.sampling import SamplingParams

IMAGES = [noise_image(100, 30, seed=1), noise_image(25, 90, seed=2), noise_image(60, 60, seed=4)]
SHARED = "You are a careful assistant who looks at every part of the picture before answering. "  # > 1 block


def requests():
    reqs = [{"prompt": p, "images": [im]} for p, im in
            zip(["What is this?", "Describe the picture in detail please.", "Colour?"], IMAGES, strict=True)]
    reqs.append({"prompt": "No image here, just text."})
    reqs += [{"prompt": SHARED + q, "images": [IMAGES[0]]} for q in ("Shape?", "Size?")]
    reqs.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                              {"role": "user", "content": "Which one?"}], "images": [IMAGES[1]]})
    return reqs


GREEDY = [SamplingParams(max_tokens=n) for n in (12, 5, 20, 9, 15, 7, 10)]
CONFIGS = {
    "roomy": EngineConfig(num_kv_blocks=256),
    "chunked": EngineConfig(num_kv_blocks=256, max_num_batched_tokens=16),
    "preempting": EngineConfig(num_kv_blocks=40, block_size=8),  # too small for all at once: recompute
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """LLaVA-NeXT (AnyRes) with grouped-query attention: 4 query heads, 2 KV heads (at 4 ranks each is kept twice)."""
    hf = build_hf_model("llava_next", text=text_config_dict(num_key_value_heads=2), seed=11)
    return write_hf_checkpoint(hf, tmp_path_factory.mktemp("tp") / "ck", "hub",
                               processor=processor_config("LlavaNextImageProcessor", image_grid_pinpoints=PINPOINTS))


@pytest.fixture(scope="module")
def single(checkpoint):
    pipe = llavakit.load(checkpoint, dtype="float32", device="cpu")
    return pipe, {name: run(engine_for(pipe, cfg), pipe, requests(), GREEDY) for name, cfg in CONFIGS.items()}


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def split(request, checkpoint):
    pipe = llavakit.load(checkpoint, dtype="float32", device="cpu", tensor_parallel_size=request.param)
    yield pipe
    pipe.model.tp_workers.close()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mixed_batches_equal_one_process(split, single, name):
    cfg = CONFIGS[name]
    engine = engine_for(split, cfg)
    outs = run(engine, split, requests(), GREEDY)
    for out, ref in zip(outs, single[1][name], strict=True):
        assert out.token_ids == ref.token_ids and out.text == ref.text
    assert engine.block_manager.num_free_blocks == cfg.num_kv_blocks
    if name == "roomy":  # asked again: the prompts come from the prefix cache, the answers do not change
        again = run(engine, split, requests()[4:6], GREEDY[4:6])
        assert all(out.num_cached_tokens > 0 for out in again)
        assert [out.token_ids for out in again] == [out.token_ids for out in outs[4:6]]
    if name == "preempting":
        assert engine.scheduler.num_preemptions > 0


def test_pipeline_generates_through_the_engine(split, single):
    pipe = single[0]
    kw = dict(images=[IMAGES[2]], max_new_tokens=14, temperature=0)
    ref = pipe.generate("Describe it.", **kw)
    out = split.generate("Describe it.", **kw)
    assert out.token_ids == ref.token_ids and out.text == ref.text and out.finish_reason == ref.finish_reason
    assert "".join(split.stream("Describe it.", **kw)) == ref.text
    stop = ref.text[len(ref.text) // 2:][:3]
    if stop.strip():
        assert split.generate("Describe it.", stop=[stop], **kw).text == pipe.generate("Describe it.", stop=[stop],
                                                                                       **kw).text
    assert split._engine().block_manager.num_free_blocks == split._engine().block_manager.num_blocks
