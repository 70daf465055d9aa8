"""`llavakit ground`: ask where something is and draw the answer's boxes on the picture."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llavakit.cli.checks import check_images, check_output
from llavakit.cli.common import CliError, add_model_flags, add_sampling_flags, load_pipeline, sampling_kwargs

HELP = "ask where something is in an image and write a PNG with the boxes drawn"
EXAMPLE = """examples:
  llavakit ground --model llava-1.5-7b --image bus.jpg --query "Where is the bus?" --out bus-boxes.png
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p, required=False)
    p.add_argument("--image", "--image-file", dest="image", required=True, help="image path or URL")
    p.add_argument("--query", required=True, help="the grounding question, e.g. 'Where is the bus?'")
    p.add_argument("--out", type=Path, default=Path("grounding.png"), help="the PNG to write")
    add_sampling_flags(p)
    p.set_defaults(temperature=0.0, max_new_tokens=64)


def run(args: argparse.Namespace) -> int:
    from llavakit.eval.grounding import ground

    check_images([args.image])
    check_output(args.out, "--out")
    pipe = load_pipeline(args)
    kwargs = sampling_kwargs(args)
    text, boxes, drawn = ground(pipe, args.image, args.query, **kwargs)
    print(text)
    if not boxes:
        quoted = text.strip() if len(text.strip()) <= 80 else text.strip()[:77] + "..."
        raise CliError(f"no box found: the answer {quoted!r} has no [x1, y1, x2, y2]; nothing was drawn and "
                       f"{args.out} was not written (ask where something is, e.g. --query 'Where is the bus?')")
    drawn.save(args.out)
    print(f"{len(boxes)} box(es) drawn to {args.out}: {[tuple(round(v) for v in b) for b in boxes]}", file=sys.stderr)
    return 0
