"""Tensor parallelism's memory and traffic per GPU, computed (not measured) from the presets.

For each model (llava-1.5-7b, llava-1.5-13b, llava-v1.6-34b), weight format (bf16, w8a16) and tensor-parallel size
(1, 2, 4, 8): the bytes of weights each rank holds, read off the model llavakit builds (on the meta device, split by
`apply_tp` for rank 0 exactly as loading splits it: the language model sharded, the vision tower and projector
replicated, the vocabulary padded); the KV cache per token and per 4096-token sequence on each rank; and the bytes
each rank sends per decode step and per token (ring all-reduce of 2 (N-1)/N of the hidden state after each
attention and MLP block and after the embedding lookup, ring all-gather of (N-1)/N of the logits).

Speed across GPUs is not measured: the machines available to the project have one GPU.

    python benchmarks/tp_memory.py                 # prints the table, writes benchmarks/results/tp_memory_<date>.json
    python benchmarks/tp_memory.py --markdown      # the table docs/parallel.md shows
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

from llavakit.models.llava import LlavaForConditionalGeneration
from llavakit.parallel.group import TPGroup
from llavakit.parallel.tp import TPError, apply_tp
from llavakit.presets import preset_config
from llavakit.quant.quantize import quantize_skeleton

MODELS = ("llava-1.5-7b", "llava-1.5-13b", "llava-v1.6-34b")
FORMATS = ("bf16", "w8a16")
SIZES = (1, 2, 4, 8)
SEQUENCE = 4096
GIB = 2 ** 30


def rank0_bytes(name: str, fmt: str, size: int) -> int | None:
    """Bytes of parameters and buffers rank 0 holds (None: the model does not split over `size` ranks)."""
    cfg = preset_config(name)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16)
        if fmt != "bf16":
            quantize_skeleton(model, fmt)
    try:
        apply_tp(model, TPGroup(0, size))
    except TPError:
        return None
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def row(name: str, fmt: str, size: int) -> dict | None:
    weights = rank0_bytes(name, fmt, size)
    if weights is None:
        return None
    t = preset_config(name).text
    kv_heads = max(1, t.num_key_value_heads // size)  # fewer KV heads than ranks: one per rank
    kv_token = 2 * t.num_hidden_layers * kv_heads * t.head_dim * 2  # keys and values, bf16
    hidden = t.hidden_size * 2
    reduces = 2 * t.num_hidden_layers + 1  # after attention and MLP in every layer, after the embedding
    ring = 2 * (size - 1) / size
    padded_vocab = -(-t.vocab_size // size) * size
    sent_per_token = reduces * ring * hidden + (size - 1) / size * padded_vocab * 2
    return {"model": name, "format": fmt, "tp": size, "weights_gib": weights / GIB,
            "kv_per_token_kib": kv_token / 1024, "kv_per_sequence_gib": kv_token * SEQUENCE / GIB,
            "sent_per_token_kib": sent_per_token / 1024, "collectives_per_step": reduces + (size > 1)}


def table(rows: list[dict]) -> str:
    lines = ["| model | weights | TP | weights / GPU (GiB) | KV / GPU per 4096-token sequence (GiB) | "
             "sent / rank / decode token (KiB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        sent = "-" if r["tp"] == 1 else f"{r['sent_per_token_kib']:.0f}"
        lines.append(f"| {r['model']} | {r['format']} | {r['tp']} | {r['weights_gib']:.2f} | "
                     f"{r['kv_per_sequence_gib']:.3f} | {sent} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown", action="store_true", help="print the markdown table only")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    rows = [r for name in MODELS for fmt in FORMATS for size in SIZES if (r := row(name, fmt, size))]
    print(table(rows))
    if not args.markdown:
        date = datetime.date.today().isoformat()
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"tp_memory_{date}.json"
        path.write_text(json.dumps({"date": date, "computed_from": "llavakit presets (meta device), rank 0",
                                    "sequence_tokens": SEQUENCE, "rows": rows}, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
