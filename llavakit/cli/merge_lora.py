"""`llavakit merge-lora`: fold a LoRA adapter into its base model and write a plain llava-hf checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from llavakit.cli.checks import check_output
from llavakit.cli.common import add_threads_flag, set_threads

HELP = "merge a LoRA adapter (llavakit train --stage lora) into its base model"
EXAMPLE = """examples:
  llavakit merge-lora --base llava-1.5-7b --lora out/final --out llava-1.5-7b-merged
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", "--model-name-or-path", dest="base", required=True, help="the base LLaVA checkpoint")
    p.add_argument("--lora", "--lora-path", dest="lora", required=True, type=Path, help="adapter directory")
    p.add_argument("--out", "--merge-model-path", dest="out", required=True, type=Path, help="output directory")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype of the written weights (auto: the base checkpoint's)")
    add_threads_flag(p)


def run(args: argparse.Namespace) -> int:
    from llavakit.train.merge import merge_lora_checkpoint

    check_output(args.out, "--out", makedirs=True, directory=True)  # before minutes of loading and merging
    set_threads(args)
    out = merge_lora_checkpoint(args.base, args.lora, args.out, args.dtype)
    print(f"merged model written to {out}")
    return 0
