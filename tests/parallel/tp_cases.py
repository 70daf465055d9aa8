"""Models split over gloo ranks and the logits they give, for test_tp_model.py (importable by spawned ranks).

`rank_main` runs in each of N spawned processes: it joins a gloo group, builds every case's model split for
its rank, and rank 0 saves the logits. The test builds the same cases unsplit in its own process and compares.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from llavakit.checkpoint_config import read_checkpoint_config
from llavakit.layers.attention import AttentionMetadata, KVCache
from llavakit.parallel.group import TPGroup
from llavakit.parallel.tp import apply_tp
from llavakit.pipeline import load_processor
from llavakit.quant.config import QuantConfig
from llavakit.train.lora import apply_lora, merge_lora
from llavakit.weights.loader import load_llava

DECODE_STEPS = 3


def _load(directory: Path, tp: TPGroup | None, quantization: QuantConfig | None = None):
    cfg = read_checkpoint_config(directory)
    return load_llava(cfg, directory, torch.float32, torch.device("cpu"), quantization=quantization, tp=tp)


def _with_lora(directory: Path, tp: TPGroup | None, merged: bool):
    """The float model with a random (non-zero) LoRA adapter on every projection, split after wrapping."""
    model = _load(directory, None)
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    if merged:
        merge_lora(model)
    return model if tp is None else apply_tp(model, tp)


def cases(dirs: dict[str, Path]) -> dict:
    """name -> build(tp) for every model the tests split."""
    return {
        "mha": lambda tp: _load(dirs["mha"], tp),
        "gqa2": lambda tp: _load(dirs["gqa"], tp),
        "odd_vocab_tied": lambda tp: _load(dirs["odd"], tp),
        "lora_unmerged": lambda tp: _with_lora(dirs["mha"], tp, merged=False),
        "lora_merged": lambda tp: _with_lora(dirs["mha"], tp, merged=True),
        "w8a16": lambda tp: _load(dirs["gqa"], tp, QuantConfig("w8a16")),
        "w4a16_g16": lambda tp: _load(dirs["gqa"], tp, QuantConfig("w4a16", 16)),
        "compressed_w4a16": lambda tp: _load(dirs["compressed"], tp),
    }


@torch.inference_mode()
def logits_of(model, directory: Path) -> torch.Tensor:
    """Prefill logits of an image prompt, then DECODE_STEPS greedy steps over a KV cache: (T + steps, V)."""
    processor = load_processor(directory)
    inputs = processor.prompt_inputs("Describe <image> please", [Image.new("RGB", (40, 30), (200, 30, 10))])
    ids = torch.tensor([inputs.ids])
    feats = model.encode_media([m.pixel_values for m in inputs.media], [m.size for m in inputs.media])
    t = model.cfg.text
    n = ids.shape[1]
    cache = KVCache(t.num_hidden_layers, 1, model.language_model.num_kv_heads, n + DECODE_STEPS, t.head_dim,
                    torch.float32, "cpu")
    hidden = model(model.embed_inputs(ids, feats), torch.arange(n)[None], cache)
    out = [model.compute_logits(hidden[0])]
    for pos in range(n, n + DECODE_STEPS):
        token = out[-1][-1].argmax().view(1, 1)
        hidden = model(model.embed_inputs(token), torch.tensor([[pos]]), cache, AttentionMetadata(start_pos=pos))
        out.append(model.compute_logits(hidden[0]))
    return torch.cat(out)


def rank_main(rank: int, size: int, init_method: str, dirs: dict[str, Path], out: Path) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    tp = TPGroup(rank, size, dist.group.WORLD, dist.group.WORLD)
    results = {}
    for name, build in cases(dirs).items():
        model = build(tp)
        heads = (model.language_model.layers[0].self_attn.num_heads, model.language_model.num_kv_heads)
        results[name] = (logits_of(model, dirs["mha" if name.startswith("lora") else _dir_key(name)]), heads)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def _dir_key(name: str) -> str:
    return {"mha": "mha", "gqa2": "gqa", "odd_vocab_tied": "odd", "compressed_w4a16": "compressed"}.get(name, "gqa")
