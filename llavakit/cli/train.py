"""`llavakit train`: pretrain, finetune or LoRA-finetune, from a config file and/or flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path

from llavakit.cli.common import CliError, add_threads_flag, set_threads
from llavakit.train.config import ALIASES, SAVE_DTYPES, SCHEDULERS, STAGES, TrainConfig, make_config

HELP = "train: stage pretrain | finetune | lora (one process, or many under torchrun)"
EXAMPLE = """examples:
  llavakit train --stage finetune --model llava-1.5-7b --data-path data.json --image-folder imgs/ \\
      --output-dir out --max-steps 20 --learning-rate 2e-5
  llavakit train recipe.yaml --learning-rate 1e-4          # a YAML/JSON config, flags override it
  llavakit train recipe.yaml --resume                       # go on from the last checkpoint in --output-dir
  llavakit train --stage pretrain --model vicuna-7b/ --vision-tower clip-vit-large-patch14-336/ \\
      --data-path blip_laion_cc_sbu_558k.json --image-folder images/ --learning-rate 1e-3
  torchrun --nproc_per_node 8 -m llavakit train recipe.yaml --distributed fsdp
every option also has its original underscore spelling (--learning_rate, --per_device_train_batch_size, ...)
"""

# What each TrainConfig option does, for --help (defaults are added from TrainConfig).
OPTION_HELP = {
    "stage": "pretrain: a new LLaVA from a text LLM (--model) and a CLIP tower (--vision-tower), only the projector "
             "trains; finetune: an existing LLaVA, projector + LLM train; lora: an existing LLaVA, LoRA adapters on "
             "the LLM + the projector train",
    "model": "the checkpoint to start from: a LLaVA checkpoint (finetune, lora) or a text LLM (pretrain); directory, "
             "hub id or alias",
    "vision_tower": "CLIP checkpoint directory: the tower of a pretrain run, or of an original-layout checkpoint "
                    "that does not contain it",
    "data_path": "training data: LLaVA JSON (an array of {id, image, conversations}) or JSON lines (.jsonl)",
    "image_folder": "folder the data's relative image paths are read from (default: none, the current directory)",
    "output_dir": "where checkpoint-N/, final/, train_log.jsonl and loss_curve.png go; must be empty or new "
                  "unless --overwrite-output-dir or --resume",
    "overwrite_output_dir": "train into a non-empty --output-dir (nothing in it is deleted; checkpoints of the same "
                            "step numbers are replaced)",
    "conv_mode": "conversation template (--version v1 means vicuna_v1); default: the checkpoint's, plain for "
                 "pretrain",
    "image_aspect_ratio": "image preprocessing instead of the checkpoint's: pad (LLaVA-1.5's expand2square), crop "
                          "(or square), anyres (LLaVA-NeXT tiling)",
    "num_train_epochs": "passes over the data (ignored when --max-steps is set)",
    "max_steps": "optimizer steps to run; -1: as many as --num-train-epochs takes",
    "per_device_train_batch_size": "rows per process per micro-step",
    "gradient_accumulation_steps": "micro-steps per optimizer step (global batch = batch size x processes x this)",
    "micro_batches_by_length": "run each device batch as N micro-batches of rows of similar length: the same "
                               "gradient, less padding",
    "learning_rate": "peak learning rate",
    "mm_projector_lr": "the projector's own learning rate (default: --learning-rate)",
    "mm_vision_tower_lr": "with --unfreeze-vision: the tower's own learning rate (default: --learning-rate)",
    "weight_decay": "AdamW weight decay (not on biases, norms and other 1-D tensors)",
    "warmup_ratio": "fraction of the steps with a linear learning-rate warmup",
    "lr_scheduler_type": "learning-rate schedule after the warmup",
    "max_grad_norm": "gradient clipping norm",
    "model_max_length": "tokens per row at most; longer rows are cut (never through an image)",
    "bf16": "compute in bfloat16 autocast (weights and optimizer stay float32)",
    "gradient_checkpointing": "recompute decoder activations in the backward pass: less memory, slower steps",
    "unfreeze_vision": "finetune the vision tower too",
    "freeze_mm_mlp_adapter": "keep the projector's weights as they are",
    "lora_r": "LoRA rank (stage lora)",
    "lora_alpha": "LoRA scaling numerator: adapters are scaled by alpha / r (stage lora)",
    "lora_dropout": "dropout on the LoRA path (stage lora)",
    "save_steps": "write a resumable checkpoint-N every this many steps",
    "save_total_limit": "keep only the newest N checkpoint-N directories (default: all)",
    "logging_steps": "log loss, learning rate and speed to train_log.jsonl every this many steps",
    "group_by_modality_length": "batches of image rows and batches of text rows, never mixed (faster)",
    "dataloader_num_workers": "DataLoader worker processes that read and preprocess rows (0: in the main process)",
    "seed": "seed of the model's new weights, data order and dropout",
    "max_bad_fraction": "stop when more than this fraction of the rows had to be skipped (bad rows, missing images); "
                        "below it a skipped row only leaves its step smaller, or skips a step whose every row is bad",
    "max_nonfinite_steps": "stop after this many non-finite losses in a row",
    "resume_from_checkpoint": "go on from a checkpoint-N directory, or 'latest' (alone, or as --resume): the last "
                              "one in --output-dir; model, optimizer, scheduler, RNG and data position are restored",
    "distributed": "under torchrun: auto (DDP), ddp or fsdp",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "image_cache_dir": "where images fetched from URLs are cached (default: OUTPUT_DIR/image_cache)",
    "save_dtype": "dtype of the weights checkpoints are saved in (default: the dtype --model is stored in; "
                  "training itself runs in float32)",
}
CHOICES = {"stage": STAGES, "lr_scheduler_type": SCHEDULERS, "distributed": ("auto", "ddp", "fsdp"),
           "save_dtype": SAVE_DTYPES}
# Flags beyond the two spellings of each option: the original's aliases, and --resume for "latest".
EXTRA_NAMES = {"resume_from_checkpoint": ["--resume"]}


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
    add_threads_flag(p)
    g = p.add_argument_group("options (defaults as in the original LLaVA scripts)")
    for f in dataclasses.fields(TrainConfig):
        kind = _base_type(f.name)
        if kind is bool:
            kwargs = dict(nargs="?", const=True, type=_bool, metavar="BOOL")
        elif f.name in CHOICES:
            kwargs = dict(choices=CHOICES[f.name])
        elif f.name == "resume_from_checkpoint":
            kwargs = dict(nargs="?", const="latest", metavar="DIR|latest")
        else:
            kwargs = dict(type=kind, metavar=f.name.upper())
        shown, hidden = _names(f.name)
        g.add_argument(*shown, dest=f.name, default=None, help=_help(f), **kwargs)
        if hidden:  # the underscore spellings work but stay out of --help (the epilog says so)
            g.add_argument(*hidden, dest=f.name, default=None, help=argparse.SUPPRESS, **kwargs)


def _names(name: str) -> tuple[list[str], list[str]]:
    """(flags shown in --help: --the-option first, then its aliases; underscore spellings, not shown)."""
    aliases = [a for a, target in ALIASES.items() if target == name]
    first = f"--{name.replace('_', '-')}"
    shown = [first, *sorted({f"--{a.replace('_', '-')}" for a in aliases} | set(EXTRA_NAMES.get(name, [])))]
    hidden = sorted({f"--{n}" for n in [name, *aliases]} - set(shown))
    return shown, hidden


def _help(f: dataclasses.Field) -> str:
    """The option's help with TrainConfig's default, unless the help says it already."""
    text = OPTION_HELP[f.name]
    if "default" in text:
        return text
    default = f.default if f.default is not dataclasses.MISSING else None
    if default == "":
        return f"{text} (required, as a flag or in the config file)"
    shown = "none" if default is None else str(default).lower() if isinstance(default, bool) else default
    return f"{text} (default: {shown})"


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse to train into a non-empty output directory unless told to (or resuming), before anything loads.
    Under torchrun only rank 0 checks: the others may see files rank 0 has begun to write, and torchrun stops
    them all when rank 0 exits."""
    out = Path(cfg.output_dir)
    if cfg.overwrite_output_dir or cfg.resume_from_checkpoint or os.environ.get("RANK", "0") != "0":
        return
    if out.exists() and not out.is_dir():
        raise CliError(f"--output-dir {out} is a file, not a directory; pass another --output-dir")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise CliError(f"--output-dir {out} is not empty ({shown}); pass --resume to go on from its last checkpoint, "
                       "--overwrite-output-dir to train into it anyway, or another --output-dir")


def run(args: argparse.Namespace) -> int:
    from llavakit.train.recipe import TrainingError, train

    set_threads(args)
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    cfg = make_config(args.config, **options)
    check_output_dir(cfg)
    try:
        history = train(cfg)
    except TrainingError as e:  # bad data or a diverged loss: the message says what to do, no traceback
        raise CliError(str(e)) from e
    trained = [s for s in history if s.tokens]  # a step whose rows were all skipped has no loss
    if trained and os.environ.get("RANK", "0") == "0":
        print(f"trained {history[-1].step} steps, final loss {trained[-1].loss:.4f}; model in {cfg.output_dir}/final",
              file=sys.stderr)
    return 0
