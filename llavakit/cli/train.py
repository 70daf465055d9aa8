"""`llavakit train`: pretrain, finetune or LoRA-finetune, from a config file and/or flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing

from llavakit.train.config import ALIASES, TrainConfig, make_config

HELP = "train: stage pretrain | finetune | lora (one process, or many under torchrun)"
EXAMPLE = """examples:
  llavakit train --stage finetune --model llava-1.5-7b --data-path data.json --image-folder imgs/ \\
      --output-dir out --max-steps 20 --learning-rate 2e-5
  llavakit train recipe.yaml --learning-rate 1e-4          # a YAML/JSON config, flags override it
  llavakit train --stage pretrain --model vicuna-7b/ --vision-tower clip-vit-large-patch14-336/ \\
      --data-path blip_laion_cc_sbu_558k.json --image-folder images/ --learning-rate 1e-3
  torchrun --nproc_per_node 8 -m llavakit train recipe.yaml --distributed fsdp
every option also has its original underscore spelling (--learning_rate, --per_device_train_batch_size, ...)
"""


def _bool(text: str) -> bool:
    value = text.lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


def _base_type(annotation: str):
    hint = typing.get_type_hints(TrainConfig)[annotation]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    return args[0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="a YAML or JSON file of options (flags override it)")
    g = p.add_argument_group("options (defaults as in the original LLaVA scripts)")
    for f in dataclasses.fields(TrainConfig):
        kind = _base_type(f.name)
        names = {f"--{f.name.replace('_', '-')}", f"--{f.name}"}
        names |= {f"--{a}" for a, target in ALIASES.items() if target == f.name}
        kwargs = dict(dest=f.name, default=None, help=f"default: {f.default!r}")
        if kind is bool:
            g.add_argument(*sorted(names), nargs="?", const=True, type=_bool, metavar="BOOL", **kwargs)
        else:
            g.add_argument(*sorted(names), type=kind, metavar=f.name.upper(), **kwargs)


def run(args: argparse.Namespace) -> int:
    from llavakit.train.recipe import train

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    cfg = make_config(args.config, **options)
    history = train(cfg)
    if history and os.environ.get("RANK", "0") == "0":
        print(f"trained {history[-1].step} steps, final loss {history[-1].loss:.4f}; model in {cfg.output_dir}/final",
              file=sys.stderr)
    return 0
