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
from llavakit.train.compat import ORIGINAL_DEFAULTS, compat_flag_types
from llavakit.train.config import (
    ALIASES,
    SAVE_DTYPES,
    SCHEDULERS,
    STAGES,
    STRATEGIES,
    TrainConfig,
    build_config,
    option_fields,
)

HELP = "train: stage pretrain | finetune | lora (one process, or many under torchrun)"
EXAMPLE = """examples:
  llavakit train --stage finetune --model llava-1.5-7b --data-path data.json --image-folder imgs/ \\
      --output-dir out --max-steps 20 --learning-rate 2e-5
  llavakit train recipe.yaml --learning-rate 1e-4          # a YAML/JSON config, flags override it
  llavakit train recipe.yaml --resume                       # go on from the last checkpoint in --output-dir
  llavakit train --stage pretrain --model vicuna-7b/ --vision-tower clip-vit-large-patch14-336/ \\
      --data-path blip_laion_cc_sbu_558k.json --image-folder images/ --learning-rate 1e-3
  torchrun --nproc_per_node 8 -m llavakit train recipe.yaml --distributed fsdp
  torchrun --nproc_per_node 8 -m llavakit.train --model_name_or_path vicuna-7b --vision_tower clip/ \
      --tune_mm_mlp_adapter True --mm_projector_type mlp2x_gelu ...   # the original train.py's command line
  llavakit train lora_sft_argument.json                     # a PaddleMIX config
every option also has its original underscore spelling (--learning_rate, --per_device_train_batch_size, ...);
the original LLaVA train.py's, transformers' and PaddleMIX's options are accepted too (docs/training-compat.md)
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
    "mm_vision_select_layer": "vision layer whose features the projector takes, when --model is a text LLM "
                              "(-2: the second to last)",
    "mm_vision_select_feature": "patch (drop CLIP's class token) or cls_patch, when --model is a text LLM",
    "mm_projector_type": "projector built when --model is a text LLM: linear, mlp2x_gelu, mlp3x_gelu, ...",
    "pretrain_mm_mlp_adapter": "an mm_projector.bin (a projector-only run writes one) whose projector (and "
                               "<im_start>/<im_end> embeddings) the new LLaVA starts from",
    "mm_use_im_start_end": "wrap each image's features in <im_start>/<im_end> (LLaVAR); the tokens are added to "
                           "the tokenizer, and the model is saved in the original layout",
    "freeze_backbone": "keep the decoder as it is (the LM head and projector still train)",
    "lora_target_modules": "layers LoRA adapts: names (q_proj v_proj ...) or regexes over module names "
                           "(default: every Linear of the decoder)",
    "quantization": "QLoRA: quantize the base's decoder weights (w4a16: int4, w8a16: int8; the original's --bits "
                    "4|8) and train LoRA adapters on it",
    "warmup_steps": "linear warmup over this many steps (overrides --warmup-ratio when > 0)",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "adam_epsilon": "AdamW epsilon",
    "fp16": "compute in float16 autocast with dynamic loss scaling (weights and optimizer stay float32)",
    "tf32": "allow TF32 matrix products on Ampere and later GPUs (no effect on CPU)",
    "fsdp_sharding": "with FSDP: full_shard (parameters, gradients and optimizer state; ZeRO-3) or shard_grad_op "
                     "(gradients and optimizer state; ZeRO-2)",
    "cpu_offload": "with FSDP on CUDA: keep sharded parameters and gradients in CPU memory",
    "report_to": "where metrics go besides train_log.jsonl: tensorboard, wandb, all or none (default: "
                 "tensorboard when it is installed)",
    "run_name": "the run's name for wandb",
    "save_strategy": "when checkpoint-N is written: steps (every --save-steps), epoch, or no",
    "eval_data_path": "rows (same format as --data-path) whose loss is computed during training",
    "evaluation_strategy": "when the eval loss is computed: no, steps (every --eval-steps) or epoch",
    "eval_steps": "evaluate every this many steps (default: --logging-steps)",
    "per_device_eval_batch_size": "eval rows per process per forward pass",
    "load_best_model_at_end": "final/ is the checkpoint with the lowest eval loss (a checkpoint is written at "
                              "every evaluation)",
}
CHOICES = {"stage": STAGES, "lr_scheduler_type": SCHEDULERS, "distributed": ("auto", "ddp", "fsdp"),
           "save_dtype": SAVE_DTYPES, "save_strategy": STRATEGIES, "evaluation_strategy": STRATEGIES,
           "mm_vision_select_feature": ("patch", "cls_patch"), "fsdp_sharding": ("full_shard", "shard_grad_op")}
LISTS = ("report_to", "lora_target_modules")  # several values: `--report_to wandb tensorboard`, as transformers
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
    return str if typing.get_origin(args[0]) is list else args[0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="a YAML or JSON file of options (flags override it); llavakit's, "
                                             "the original LLaVA's or PaddleMIX's keys")
    p.add_argument("--defaults", choices=("llavakit", "original"), default="llavakit",
                   help="defaults of unset options: llavakit's (those of LLaVA-1.5's scripts) or the original "
                        "train.py's (`python -m llavakit.train` uses these)")
    add_threads_flag(p)
    g = p.add_argument_group("options (defaults as in the original LLaVA scripts)")
    for f in dataclasses.fields(TrainConfig):
        kwargs = _kwargs(f.name, _base_type(f.name))
        shown, hidden = _names(f.name)
        g.add_argument(*shown, dest=f.name, default=None, help=_help(f), **kwargs)
        if hidden:  # the underscore spellings work but stay out of --help (the epilog says so)
            g.add_argument(*hidden, dest=f.name, default=None, help=argparse.SUPPRESS, **kwargs)
    c = p.add_argument_group("the original LLaVA's, transformers' and PaddleMIX's own options",
                             "accepted and translated (--tune_mm_mlp_adapter, --lora_enable, --fsdp, --deepspeed, "
                             "--bits, ...); see docs/training-compat.md")
    for name, kind in compat_flag_types().items():
        kwargs = _kwargs(name, kind)
        spellings = sorted({f"--{name}", f"--{name.replace('_', '-')}"})
        c.add_argument(*spellings, dest=f"compat_{name}", default=None, help=argparse.SUPPRESS, **kwargs)
    p.error = types.MethodType(_one_line_error, p)
    p.parse_known_args = types.MethodType(_no_unknown_flags(p.parse_known_args), p)


def _kwargs(name: str, kind: type) -> dict:
    if kind is bool:
        return dict(nargs="?", const=True, type=_bool, metavar="BOOL")
    if name in CHOICES:
        return dict(choices=CHOICES[name])
    if name == "resume_from_checkpoint":
        return dict(nargs="?", const="latest", metavar="DIR|latest")
    if name in LISTS:
        return dict(nargs="+", metavar=name.upper())
    if name == "fsdp":  # `--fsdp "full_shard auto_wrap"` or `--fsdp full_shard auto_wrap`
        return dict(nargs="+", metavar="FSDP")
    return dict(type=kind, metavar=name.upper())


def _no_unknown_flags(parse):
    """The subparser's parse_known_args, reporting unknown flags itself (else the top-level parser does, in two
    lines that never mention where the options are listed)."""
    def parse_known_args(parser, args=None, namespace=None):
        known, unknown = parse(args, namespace)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return known, unknown
    return parse_known_args


def _one_line_error(parser: argparse.ArgumentParser, message: str) -> None:
    """argparse's errors as one line, exit 2; an unknown flag points to the option mapping."""
    if message.startswith("unrecognized arguments"):
        message = (f"{message.replace('unrecognized arguments', 'unknown options')}; `llavakit train --help` "
                   "lists llavakit's, docs/training-compat.md the original LLaVA's and PaddleMIX's")
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


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
    options = {name: getattr(args, name) for name in option_fields()}
    options |= {name: getattr(args, f"compat_{name}") for name in compat_flag_types()}
    if isinstance(options["fsdp"], list):
        options["fsdp"] = " ".join(options["fsdp"])
    cfg, notes = build_config(args.config, options, ORIGINAL_DEFAULTS if args.defaults == "original" else None)
    if os.environ.get("RANK", "0") == "0":
        for note in dict.fromkeys(notes):
            print(f"note: {note}", file=sys.stderr)
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
