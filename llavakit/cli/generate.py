"""`llavakit generate`: one answer to one prompt, as text or JSON with token counts and timings."""

from __future__ import annotations

import argparse
import json
import sys
import time

from llavakit.cli.checks import check_images, check_videos
from llavakit.cli.common import add_model_flags, add_sampling_flags, load_pipeline, number, sampling_kwargs

HELP = "answer one prompt about one or more images or videos"
EXAMPLE = """examples:
  llavakit generate --model llava-1.5-7b --image photo.jpg --prompt "What is this?"
  llavakit generate --model DIR --image a.png --image b.png --prompt "Compare the two." --json
  llavakit generate --model DIR --image a.png --conv-mode raw --prompt "USER: <image>\\nHi ASSISTANT:"
  llavakit generate --model llava-next-video-7b --video clip.mp4 --video-frames 16 --prompt "Why is it funny?"
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p, required=False)
    p.add_argument("--image", "--image-file", dest="images", action="append", default=[], metavar="PATH_OR_URL",
                   help="image file, http(s) URL or data: URL (repeatable, in prompt order)")
    p.add_argument("--video", dest="videos", action="append", default=[], metavar="PATH_OR_URL",
                   help="video file, http(s) URL or data: URL (repeatable; LLaVA-NeXT-Video checkpoints)")
    p.add_argument("--video-frames", type=number(int, 1), metavar="N",
                   help="frames sampled uniformly from each video (default: the checkpoint's, else 32)")
    p.add_argument("--prompt", "--query", dest="prompt", required=True,
                   help="the question; <image> / <video> in it mark where each image / video goes (else they "
                        "come first); with --conv-mode raw, the whole prompt with one tag per image and video")
    p.add_argument("--json", action="store_true", help="print text, token counts and timings as JSON")
    add_sampling_flags(p)


def run(args: argparse.Namespace) -> int:
    check_images(args.images)  # a bad image or video fails before the model loads
    check_videos(args.videos)
    start = time.perf_counter()
    pipe = load_pipeline(args)
    load_ms = (time.perf_counter() - start) * 1e3
    kwargs = dict(images=args.images, videos=args.videos, conv_mode=args.conv_mode, **sampling_kwargs(args))
    if not args.json:
        for piece in pipe.stream(args.prompt, **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    out = pipe.generate(args.prompt, **kwargs)
    t = out.timings
    decoded = max(len(out.token_ids) - 1, 0)  # the first token comes from the prefill
    print(json.dumps({
        "text": out.text, "finish_reason": out.finish_reason,
        "prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(out.token_ids),
        "timings_ms": {"load": round(load_ms, 1), "preprocess": round(t.preprocess_ms, 2),
                       "vision": round(t.vision_ms, 2), "prefill": round(t.prefill_ms, 2),
                       "decode": round(t.decode_ms, 2)},
        "decode_tokens_per_second": round(decoded / (t.decode_ms / 1e3), 2) if t.decode_ms else None,
    }, ensure_ascii=False))
    return 0
