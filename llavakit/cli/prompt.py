"""`llavakit prompt`: show the exact prompt text and input ids a checkpoint's template produces."""

from __future__ import annotations

import argparse
import itertools

from PIL import Image

from llavakit.cli.common import add_model_flags, set_threads, template_override
from llavakit.pipeline import load_processor
from llavakit.weights.hub import resolve_alias, resolve_model_dir

HELP = "print the rendered prompt and its token ids (no weights are loaded)"
EXAMPLE = """examples:
  llavakit prompt --model llava-1.5-7b "What is in the picture?"
  llavakit prompt --model DIR --conv-mode llava_v1 --image photo.jpg "Describe it."
  llavakit prompt --model DIR --num-images 0 "Just text."
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p, required=False, quantization=False)
    p.add_argument("question", help="the user's question")
    p.add_argument("--image", "--image-file", dest="images", action="append", default=[], metavar="PATH_OR_URL",
                   help="image (its size decides the AnyRes token count); default: one square image")
    p.add_argument("--num-images", type=int, default=None,
                   help="number of placeholder images when no --image is given (default 1)")


def _placeholders(n: int, size: int) -> list[Image.Image]:
    return [Image.new("RGB", (size, size)) for _ in range(n)]


def _compact(tokenizer, ids: list[int], image_id: int) -> str:
    """Token pieces with runs of image placeholders folded: '<image> x576'."""
    parts = []
    for key, run in itertools.groupby(ids):
        n = len(list(run))
        if key == image_id:
            parts.append(f"[<image> x{n}]")
        else:
            parts.extend([repr(tokenizer.convert_ids_to_tokens(key))] * n)
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    set_threads(args)
    processor = load_processor(resolve_model_dir(resolve_alias(args.model), args.revision),
                               vision_tower=args.vision_tower, conv_mode=template_override(args),
                               image_aspect_ratio=args.image_aspect_ratio)
    images = args.images or _placeholders(1 if args.num_images is None else args.num_images,
                                          processor.cfg.image.crop_size)
    text = processor.render_prompt(args.question, len(images), "raw" if args.conv_mode == "raw" else None)
    ids = processor.tokenize(text, processor.prepare_images(images))
    print(f"template: {processor.template.name}")
    print("prompt:")
    print(text)
    print(f"ids ({len(ids)} tokens, {ids.count(processor.cfg.image_token_id)} image placeholders):")
    print(ids)
    print("tokens:")
    print(_compact(processor.tokenizer, ids, processor.cfg.image_token_id))
    return 0
