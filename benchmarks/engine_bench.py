"""Engine speed on the CPU-sized `bench-small` model (8 decoder layers of 512, a 4-layer tower, 64 image
tokens) against transformers on the same random weights: builds the checkpoint once, then runs
`llavakit bench --compare-transformers` (MindIE's performance protocol at `--output-tokens`, then 32
offline requests; every shape warmed up untimed first, every request its own image, transformers on the
same requests; `--repeats` rounds of both, medians and min/max reported).

    python benchmarks/engine_bench.py [--workdir /tmp/llavakit-bench/engine] [--output-tokens 128] [--requests 32]
        [--batch-sizes 1,2,...,10] [--repeats 3] [--threads N] [--distinct-images N] [--out DIR]
    python benchmarks/engine_bench.py --output-tokens 8 --requests 4 --batch-sizes 1,2 --out /tmp/bench  # smoke run
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch

from llavakit.assets import LLAMA_TOKENIZER_DIR


def build_checkpoint(directory: Path) -> Path:
    """bench-small with random weights, saved in llava-hf layout with a LLaMA tokenizer (+ <image>, <pad>)."""
    if (directory / "config.json").is_file():
        return directory
    from transformers import AutoTokenizer

    from llavakit.presets import preset_config
    from llavakit.weights.loader import random_llava
    from llavakit.weights.save import save_llava_hf

    tok = AutoTokenizer.from_pretrained(LLAMA_TOKENIZER_DIR)
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    cfg = preset_config("bench-small")
    model = random_llava(cfg, torch.float32, torch.device("cpu"))
    d = cfg.vision.hidden_size
    extra = {"vision_tower.vision_model.post_layernorm.weight": torch.ones(d),
             "vision_tower.vision_model.post_layernorm.bias": torch.zeros(d)}
    for k in range(cfg.feature_layers[0], cfg.vision.num_hidden_layers):  # the unused last tower layer
        for name, shape in [("layer_norm1", (d,)), ("layer_norm2", (d,))]:
            extra[f"vision_tower.vision_model.encoder.layers.{k}.{name}.weight"] = torch.ones(shape)
            extra[f"vision_tower.vision_model.encoder.layers.{k}.{name}.bias"] = torch.zeros(shape)
        for name, (o, i) in [("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d, d)), ("self_attn.v_proj", (d, d)),
                             ("self_attn.out_proj", (d, d)), ("mlp.fc1", (cfg.vision.intermediate_size, d)),
                             ("mlp.fc2", (d, cfg.vision.intermediate_size))]:
            extra[f"vision_tower.vision_model.encoder.layers.{k}.{name}.weight"] = torch.randn(o, i) * 0.02
            extra[f"vision_tower.vision_model.encoder.layers.{k}.{name}.bias"] = torch.zeros(o)
    return save_llava_hf(model, directory, tokenizer=tok, extra_tensors=extra)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llavakit-bench/engine"))
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,2,3,4,5,6,7,8,9,10")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of engine then transformers (medians)")
    parser.add_argument("--threads", type=int, help="torch threads of both sides (default: llavakit's --threads)")
    parser.add_argument("--distinct-images", type=int, help="reuse images (default: every request its own)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    ckpt = build_checkpoint(args.workdir / "bench-small")
    from llavakit.cli import main as cli

    extra = ["--threads", str(args.threads)] if args.threads else []
    extra += ["--distinct-images", str(args.distinct_images)] if args.distinct_images else []
    return cli(["bench", "--model", str(ckpt), "--dtype", "float32", "--device", "cpu", "--compare-transformers",
                "--output-tokens", str(args.output_tokens), "--requests", str(args.requests),
                "--batch-sizes", args.batch_sizes, "--repeats", str(args.repeats), "--out", str(args.out),
                "--name", f"engine_bench-small_cpu-{os.cpu_count()}c_{datetime.date.today().isoformat()}", *extra])


if __name__ == "__main__":
    sys.exit(main())
