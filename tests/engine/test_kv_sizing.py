"""How many KV blocks the engine allocates: on the CPU, what max_model_len x max_num_seqs need (not a fixed
4 GiB); num_kv_blocks, kv_cache_memory and CUDA's gpu_memory_utilization as before."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from checkpoints import build_hf_model, write_hf_checkpoint
from conftest import noise_image

from llavakit.config import EngineConfig
from llavakit.engine import model_runner
from llavakit.engine.llm_engine import LLMEngine
from llavakit.engine.model_runner import kv_block_bytes, num_kv_blocks
from llavakit.llm import LLM
from llavakit.sampling import SamplingParams


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_hf_checkpoint(build_hf_model("llava", seed=3), tmp_path_factory.mktemp("kv") / "ck", "hub")


def kv_shapes(engine: LLMEngine) -> set[tuple[int, ...]]:
    return {tuple(t.shape) for layer in engine.runner.kv_cache for t in layer}


def test_cpu_cache_holds_exactly_max_num_seqs_full_sequences_and_runs_them(ckpt):
    llm = LLM(str(ckpt), dtype="float32", device="cpu", max_model_len=100, max_num_seqs=3, block_size=16)
    engine = llm.engine
    t = llm.pipe.config.text
    needed = -(-100 // 16) * 3  # ceil(max_model_len / block_size) blocks for each of max_num_seqs sequences
    assert engine.block_manager.num_blocks == needed == 21
    # one spare block past the block manager's range (the padding rows' trash block), keys and values per layer
    assert kv_shapes(engine) == {(needed + 1, 16, t.num_key_value_heads, t.head_dim)}
    assert len(engine.runner.kv_cache) == t.num_hidden_layers
    # three sequences that all grow to max_model_len at once fit without preemption
    reqs = [{"prompt": q, "images": [noise_image(40, 30, seed=i)]}
            for i, q in enumerate(["What is this?", "Describe it.", "Colour?"])]
    outs = llm.generate(reqs, SamplingParams(max_tokens=500, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["length"] * 3
    assert all(len(o.prompt_token_ids) + len(o.token_ids) == 100 for o in outs)
    assert engine.scheduler.num_preemptions == 0
    assert engine.block_manager.num_free_blocks == needed  # nothing leaked


def test_cpu_default_is_the_model_context_for_max_num_seqs(ckpt):
    llm = LLM(str(ckpt), dtype="float32", device="cpu", max_num_seqs=4)
    engine = llm.engine
    assert engine.max_model_len == 512
    assert engine.block_manager.num_blocks == 512 // 16 * 4
    # the scheduler never runs more sequences than max_num_batched_tokens, so no blocks for more
    small = LLMEngine(llm.pipe.model, llm.pipe.tokenizer,
                      EngineConfig(max_num_seqs=8, max_num_batched_tokens=2, max_model_len=33, block_size=8))
    assert small.block_manager.num_blocks == 5 * 2


def test_cpu_cache_is_capped_and_explicit_sizes_win(ckpt, monkeypatch):
    llm = LLM(str(ckpt), dtype="float32", device="cpu", max_model_len=64, max_num_seqs=2)
    model, per_block = llm.pipe.model, kv_block_bytes(llm.pipe.model, 16)
    monkeypatch.setattr(model_runner, "HOST_KV_CACHE_LIMIT", 5 * per_block + 7)
    assert num_kv_blocks(model, EngineConfig(max_num_seqs=64), 64) == 5  # capped by the budget
    with pytest.raises(ValueError, match="less than max_model_len"):
        num_kv_blocks(model, EngineConfig(max_num_seqs=1), 128)  # one full sequence does not fit the budget
    assert num_kv_blocks(model, EngineConfig(num_kv_blocks=3), 512) == 3
    assert num_kv_blocks(model, EngineConfig(kv_cache_memory=40 * per_block + 1), 64) == 40


def test_cuda_sizing_still_follows_gpu_memory_utilization(ckpt, monkeypatch):
    llm = LLM(str(ckpt), dtype="float32", device="cpu", max_model_len=64, max_num_seqs=2)
    cfg = llm.pipe.model.cfg
    fake = SimpleNamespace(cfg=cfg, language_model=llm.pipe.model.language_model, device=torch.device("cuda"),
                           dtype=torch.float16)
    per_block = kv_block_bytes(fake, 16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 << 30, 80 << 30))
    expected = int((60 << 30) - 0.1 * (80 << 30)) // per_block
    assert num_kv_blocks(fake, EngineConfig(max_num_seqs=2, gpu_memory_utilization=0.9), 64) == expected
    assert expected > -(-64 // 16) * 2  # not the CPU rule
