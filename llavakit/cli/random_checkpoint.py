"""`llavakit random-checkpoint`: a llava-hf checkpoint directory with random weights at a preset's size."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llavakit.cli.common import CliError

HELP = "write a llava-hf checkpoint with random weights (tiny ones to try every command in seconds)"
EXAMPLE = """examples:
  llavakit random-checkpoint --out tiny-llava                      # 2 layers, 28-px images, 17 MB
  llavakit random-checkpoint --preset tiny-next --out tiny-next    # the same in LLaVA-NeXT's AnyRes layout
  llavakit generate --model tiny-llava --image examples/images/shapes.png --prompt "Hi" --max-new-tokens 8
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llavakit.presets import LLAMA_VOCAB_PRESETS

    p.add_argument("--preset", default="tiny", choices=LLAMA_VOCAB_PRESETS,
                   help="model size and kind (the published ones are real sizes: gigabytes)")
    p.add_argument("--out", type=Path, required=True, help="the directory to write (must not exist or be empty)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--seed", type=int, default=0, help="the random weights' seed")


def run(args: argparse.Namespace) -> int:
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise CliError(f"{args.out} already exists and is not an empty directory; choose another --out")
    path = write_random_checkpoint(args.preset, args.out, args.dtype, args.seed)
    size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    print(f"{path}: a random {args.preset} llava-hf checkpoint ({size:.0f} MB); try it with --model {path}",
          file=sys.stderr)
    return 0


def write_random_checkpoint(preset: str, out: Path, dtype: str = "float32", seed: int = 0) -> Path:
    """Random weights (`load_format="dummy"`) saved with the LLaMA tokenizer plus llava-hf's <image> and <pad>."""
    import torch
    from transformers import AutoTokenizer

    from llavakit.presets import preset_config, preset_tokenizer_dir
    from llavakit.weights.loader import random_llava
    from llavakit.weights.save import save_llava_hf

    cfg = preset_config(preset)
    tokenizer = AutoTokenizer.from_pretrained(preset_tokenizer_dir(preset))
    tokenizer.add_tokens(["<image>", "<pad>"], special_tokens=True)
    tokenizer.pad_token = "<pad>"
    model = random_llava(cfg, getattr(torch, dtype), torch.device("cpu"), seed=seed)
    return save_llava_hf(model, out, tokenizer, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
