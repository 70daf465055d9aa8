"""apply_tp over 2 and 4 gloo ranks gives the unsplit model's fp32 logits (within 1e-5), prefill and decode.

One spawn per world size runs every case (tp_cases.py): LLaVA-1.5-style multi-head attention; grouped-query
attention with 2 KV heads (at 4 ranks each KV head is kept by two ranks); a vocabulary that divides by neither
2 nor 4, with tied embeddings; LoRA unmerged and merged; W8A16 and W4A16 quantized on load; a
compressed-tensors checkpoint.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from checkpoints import build_hf_model, processor_config, text_config_dict, write_hf_checkpoint
from tp_cases import cases, logits_of, rank_main

from llavakit.cli import main
from llavakit.layers.embedding import Embedding
from llavakit.parallel.group import TPGroup
from llavakit.parallel.tp import TPError, apply_tp, check_splittable, kv_heads_of_rank

PAD = processor_config("LlavaImageProcessor", do_pad=True)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    out = {
        "mha": write_hf_checkpoint(build_hf_model("llava", seed=1), root / "mha", processor=PAD),
        "gqa": write_hf_checkpoint(build_hf_model("llava", text=text_config_dict(num_key_value_heads=2), seed=2),
                                   root / "gqa", processor=PAD),
        "odd": write_hf_checkpoint(build_hf_model("llava", text=text_config_dict(vocab_size=32003,
                                                                                 tie_word_embeddings=True), seed=3),
                                   root / "odd", processor=PAD),
    }
    out["compressed"] = root / "compressed"
    assert main(["convert", "--model", str(out["gqa"]), "--out", str(out["compressed"]), "--quantization", "w4a16",
                 "--group-size", "16"]) == 0
    return out


@pytest.fixture(scope="module")
def unsplit(dirs):
    return {name: logits_of(build(None), dirs[_key(name)]) for name, build in cases(dirs).items()}


def _key(name: str) -> str:
    return {"mha": "mha", "gqa2": "gqa", "odd_vocab_tied": "odd", "compressed_w4a16": "compressed"}.get(
        name, "mha" if name.startswith("lora") else "gqa")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("size", [2, 4])
def test_split_model_gives_the_unsplit_logits(size, dirs, unsplit, tmp_path):
    out = tmp_path / "logits.pt"
    mp.start_processes(rank_main, args=(size, f"tcp://127.0.0.1:{_free_port()}", dirs, out), nprocs=size,
                       start_method="spawn")
    split = torch.load(out)
    assert split.keys() == unsplit.keys()
    for name, (logits, (heads, kv_heads)) in split.items():
        assert heads == 4 // size, name
        assert kv_heads == (1 if name in ("gqa2", "w8a16", "w4a16_g16", "compressed_w4a16") else 4 // size), name
        ref = unsplit[name]
        assert logits.shape == ref.shape, name  # the padded vocabulary's rows are dropped
        torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5, msg=name)
        assert torch.equal(logits.argmax(-1), ref.argmax(-1)), name


def test_kv_heads_each_rank_keeps():
    assert [kv_heads_of_rank(8, 8, 4, r) for r in range(4)] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    # 8 query heads, 2 KV heads, 4 ranks: ranks 0-1 hold query heads 0-3, which read KV head 0
    assert [kv_heads_of_rank(8, 2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [kv_heads_of_rank(32, 8, 8, r)[0] for r in range(8)] == [0, 1, 2, 3, 4, 5, 6, 7]


def test_sizes_that_do_not_split_are_refused_in_words(dirs):
    from llavakit.checkpoint_config import read_checkpoint_config
    from llavakit.quant.config import QuantConfig

    t = read_checkpoint_config(dirs["gqa"]).text  # 4 heads, 2 KV heads, MLP 128
    with pytest.raises(TPError, match="4 attention heads, which do not split evenly over 3 ranks"):
        check_splittable(t, 3)
    with pytest.raises(TPError, match="w4a16 with group size 32 cannot split the attention output width 64 over 4"):
        check_splittable(t, 4, QuantConfig("w4a16", 32))
    check_splittable(t, 4, QuantConfig("w4a16", 16))
    t.num_attention_heads, t.num_key_value_heads = 12, 3
    with pytest.raises(TPError, match="3 key/value heads: a tensor-parallel size must divide 3 or be a multiple"):
        check_splittable(t, 2)


def test_the_embedding_splits_a_padded_vocabulary():
    """32003 rows at 4 ranks: 8001 per rank, the last rank's final rows zero padding."""
    full = Embedding(32003, 8)
    parts = [apply_tp_embedding(full, r, 4) for r in range(4)]
    assert all(p.weight.shape == (8001, 8) for p in parts)
    assert torch.equal(torch.cat([p.weight for p in parts])[:32003], full.weight.detach())
    assert not parts[3].weight[32003 - 3 * 8001:].any()


def apply_tp_embedding(full, rank, size):
    from llavakit.parallel.tp import VocabParallelEmbedding

    return VocabParallelEmbedding(full, rank * 8001, 8001, TPGroup(rank, size))


def test_a_layer_type_tp_cannot_split_is_refused(dirs):
    from tp_cases import _load

    model = _load(dirs["mha"], None)
    model.language_model.layers[0].mlp.up_proj = torch.nn.Identity()
    with pytest.raises(TPError, match="up_proj is a Identity, which tensor parallelism cannot split"):
        apply_tp(model, TPGroup(0, 2))
