"""`llavakit convert`: write a checkpoint in another layout (llava-hf / original), dtype, or quantized.

A quantized checkpoint is in the compressed-tensors format, which llavakit, transformers (with the
compressed-tensors package), vLLM and SGLang read. Weights are read once, layer by layer, and quantized as
they are read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llavakit.cli.checks import check_output
from llavakit.cli.common import CliError, add_quantization_flags, add_threads_flag, quantization_arg, set_threads

HELP = "convert a checkpoint to another layout (llava-hf, original), dtype, or quantize it (w8a16, w4a16)"
EXAMPLE = """examples:
  llavakit convert --model liuhaotian/llava-v1.5-7b --vision-tower clip-336/ --out llava-1.5-7b-hf
  llavakit convert --model llava-1.5-7b --out llava-1.5-7b-w4a16 --quantization w4a16 --dtype bfloat16
  llavakit convert --model llava-hf/llava-1.5-7b-hf --out llava-v1.5-7b --layout original
"""
LAYOUTS = ("llava-hf", "original")
VOCAB_MULTIPLE = 64  # transformers' LLaVA conversion pads a grown vocabulary to a multiple of 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--model-path", dest="model", required=True, metavar="M",
                   help="checkpoint directory, hub id (org/name) or alias such as llava-1.5-7b")
    p.add_argument("--out", required=True, type=Path, help="the directory to write (must not exist or be empty)")
    p.add_argument("--layout", choices=LAYOUTS,
                   help="the layout to write (default: llava-hf, or original for an original-layout checkpoint)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype of the written float weights and scales (auto: the checkpoint's own)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--vision-tower", metavar="DIR",
                   help="local CLIP directory for original checkpoints whose tower is not inside")
    add_quantization_flags(p)
    add_threads_flag(p)


def run(args: argparse.Namespace) -> int:
    quantization = quantization_arg(args)
    check_output(args.out, "--out", makedirs=True, directory=True)  # before minutes of loading
    if args.out.is_dir() and any(args.out.iterdir()):
        raise CliError(f"--out {args.out} is not empty; choose a new or empty directory")
    set_threads(args)
    out = convert_checkpoint(args.model, args.out, layout=args.layout, dtype=args.dtype, quantization=quantization,
                             vision_tower=args.vision_tower, revision=args.revision)
    print(f"{out}: written", file=sys.stderr)
    tower = out / "vision_tower"
    if tower.is_dir():
        print(f"its vision tower is in {tower}: load it with --vision-tower {tower}", file=sys.stderr)
    return 0


def convert_checkpoint(model: str | Path, out: Path, *, layout: str | None = None, dtype: str = "auto",
                       quantization=None, vision_tower: str | Path | None = None, revision: str | None = None) -> Path:
    """Load `model` (quantizing its language model as it is read when `quantization` is a QuantConfig) and write
    it to `out` in `layout` (default: the source's, llava-hf for transformers-5 names), in `dtype` (auto: the
    source's). The tower tensors llavakit never runs are carried over, so other loaders find every tensor."""
    import torch

    from llavakit.pipeline import load_processor
    from llavakit.weights.hub import resolve_alias, resolve_model_dir
    from llavakit.weights.loader import load_llava
    from llavakit.weights.save import save_llava_hf, unused_source_tensors
    from llavakit.weights.save_original import save_original

    directory = resolve_model_dir(resolve_alias(str(model)), revision)
    processor = load_processor(directory, vision_tower=vision_tower)
    cfg = processor.cfg
    layout = layout or ("original" if cfg.layout == "original" else "llava-hf")
    target = source_dtype(directory) if dtype == "auto" else getattr(torch, dtype)
    net = load_llava(cfg, directory, target, torch.device("cpu"), quantization=quantization)
    extra = unused_source_tensors(directory, cfg)
    if layout == "original":
        return save_original(net, out, processor.tokenizer, extra_tensors=extra)
    tokenizer, token = _with_image_token(net, processor.tokenizer)
    return save_llava_hf(net, out, tokenizer, extra_tensors=extra, image_token_id=token)


def source_dtype(directory: Path):
    """The dtype a checkpoint's config.json records (torch_dtype / dtype), else that of its first float tensor."""
    import torch

    from llavakit.config import load_json
    from llavakit.weights.files import find_weight_files, iter_tensors

    raw = load_json(directory / "config.json")
    name = raw.get("torch_dtype") or raw.get("dtype") or (raw.get("text_config") or {}).get("torch_dtype")
    if name in ("float32", "float16", "bfloat16"):
        return getattr(torch, name)
    for _, get in iter_tensors(find_weight_files(directory)):
        tensor = get()
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _with_image_token(net, tokenizer):
    """llava-hf marks images with a real "<image>" token where an original-layout model has the -200 placeholder:
    give it "<image>" and "<pad>" (the pad token) as transformers' convert_llava_weights_to_hf does, and where the
    embedding has no rows for them (liuhaotian/llava-v1.5-7b keeps 32000), grow the embedding and LM head to the
    next multiple of 64 (32064 for LLaMA, as llava-hf's checkpoints have). Returns (tokenizer, image token id)."""
    from transformers import AddedToken

    from llavakit.weights.save import grow_vocabulary

    if net.cfg.image_token_id >= 0:
        return tokenizer, None
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    if "<pad>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if len(tokenizer) > net.cfg.text.vocab_size:
        grow_vocabulary(net, -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
    if tokenizer.pad_token_id is not None:
        net.cfg.text.pad_token_id = tokenizer.pad_token_id
    return tokenizer, tokenizer.convert_tokens_to_ids("<image>")
