"""The engine with video requests against the plain generate loop: videos alone, mixed with images and
text-only requests, in chunks, with preemption; a repeated video runs the tower once (counted)."""

from __future__ import annotations

import pytest
from conftest import noise_image
from engine_runs import engine_for, run
from videos import next_video_checkpoint, noise_frames, write_video

import llavakit
from llavakit.config import EngineConfig
from llavakit.llm import LLM
from llavakit.sampling import SamplingParams

FRAMES = 4  # 4 frames x 4 tokens: 16 video tokens per video


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("video-engine")
    _, d = next_video_checkpoint(root / "ck", seed=7)
    videos = [str(write_video(root / f"v{i}.mp4", noise_frames(6 + i, 40, 30, seed=i))) for i in range(3)]
    return d, llavakit.load(d, dtype="float32", device="cpu", num_frames=FRAMES), videos


def requests(videos):
    return [
        {"prompt": "What happens in the video?", "videos": [videos[0]]},
        {"prompt": "Describe the picture.", "images": [noise_image(60, 40, seed=1)]},
        {"prompt": "Does <video> show <image>?", "images": [noise_image(30, 70, seed=2)], "videos": [videos[1]]},
        {"prompt": "No media, just text."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "And now?"}], "videos": [videos[0]]},
    ]


def reference(pipe, req, **kw):
    media = {"images": req.get("images"), "videos": req.get("videos")}
    if "messages" in req:
        return pipe.chat(req["messages"], **media, **kw)
    return pipe.generate(req["prompt"], **media, **kw)


GREEDY = [SamplingParams(max_tokens=n) for n in (12, 5, 10, 7, 9)]


@pytest.mark.parametrize("cfg", [
    EngineConfig(num_kv_blocks=256),
    EngineConfig(num_kv_blocks=256, max_num_batched_tokens=16),  # chunked prefill: videos cut into pieces
    EngineConfig(num_kv_blocks=40, block_size=8),  # too small for all at once: preemption by recompute
], ids=["roomy", "chunked", "preempting"])
def test_video_requests_equal_the_plain_loop(tiny, cfg):
    _, pipe, videos = tiny
    engine = engine_for(pipe, cfg)
    outs = run(engine, pipe, requests(videos), GREEDY)
    for req, p, out in zip(requests(videos), GREEDY, outs, strict=True):
        ref = reference(pipe, req, max_new_tokens=p.max_tokens)
        assert out.prompt_token_ids == ref.prompt_token_ids
        assert out.token_ids == ref.token_ids and out.text == ref.text
    assert outs[0].prompt_token_ids.count(pipe.config.video_token_id) == FRAMES * pipe.config.tokens_per_frame
    assert engine.block_manager.num_free_blocks == cfg.num_kv_blocks  # nothing leaked


def test_a_repeated_video_is_encoded_once(tiny):
    _, pipe, videos = tiny
    engine = engine_for(pipe, EngineConfig(num_kv_blocks=256, block_size=8))
    same = [{"prompt": p, "videos": [videos[2]]} for p in ("What is it?", "Colour?", "How long is it?")]
    first = run(engine, pipe, same, SamplingParams(max_tokens=4))
    assert (engine.runner.videos_encoded, engine.runner.images_encoded) == (1, 0)
    again = run(engine, pipe, same[:1], SamplingParams(max_tokens=4))[0]
    assert engine.runner.videos_encoded == 1 and again.num_cached_tokens > 0
    assert again.token_ids == first[0].token_ids
    other = run(engine, pipe, [{"prompt": "What is it?", "videos": [videos[1]]}], SamplingParams(max_tokens=6))[0]
    assert engine.runner.videos_encoded == 2  # same placeholder ids, other frames: no cache collision
    assert other.token_ids == pipe.generate("What is it?", videos=[videos[1]], max_new_tokens=6).token_ids


def test_expanded_prompt_token_ids_with_a_video_and_an_image(tiny):
    _, pipe, videos = tiny
    image = noise_image(50, 20, seed=8)
    ids = pipe.tokenize("Is <image> in <video>?", images=[image], videos=[videos[0]])
    engine = engine_for(pipe, EngineConfig(num_kv_blocks=256))
    out = run(engine, pipe, [{"prompt_token_ids": ids, "images": [image], "videos": [videos[0]]}],
              SamplingParams(max_tokens=8))[0]
    assert out.token_ids == pipe.generate("Is <image> in <video>?", images=[image], videos=[videos[0]],
                                          max_new_tokens=8).token_ids
    with pytest.raises(ValueError, match="prompt_token_ids lack the 16 placeholders of video 1"):
        pipe.processor.token_inputs(ids[:20], videos=[videos[0]])


def test_llm_api_takes_videos_and_the_frame_count(tiny):
    d, pipe, videos = tiny
    llm = LLM(str(d), dtype="float32", device="cpu", num_kv_blocks=128, num_frames=FRAMES)
    reqs = requests(videos)[:3]
    outs = llm.generate(reqs, SamplingParams(max_tokens=6), use_tqdm=False)
    assert [o.text for o in outs] == [reference(pipe, r, max_new_tokens=6).text for r in reqs]
