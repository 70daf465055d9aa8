"""Flags and helpers shared by the subcommands: model selection, sampling, one-line errors."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from llavakit.processing.media import FetchPolicy

# Errors a user can fix: printed as one line (exit 1); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, KeyError)


class CliError(Exception):
    """A runtime problem to report as one line."""


def add_model_flags(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "--model-path", dest="model", required=required, metavar="M",
                   help="checkpoint directory, hub id (org/name) or alias such as llava-1.5-7b"
                        + ("" if required else "; default: the built-in demo model"))
    g.add_argument("--revision", help="hub revision (branch, tag or commit)")
    g.add_argument("--vision-tower", metavar="DIR",
                   help="local CLIP directory for original checkpoints whose tower is not inside")
    g.add_argument("--conv-mode", metavar="NAME",
                   help="conversation template (vicuna_v1, llava_v1, mistral_instruct, chatml_direct, ...)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.2, help="0 is greedy (default 0.2, as LLaVA's CLI)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=512)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens, seed=args.seed,
                stop=list(args.stop))


def load_pipeline(args: argparse.Namespace):
    """The model the flags name, with progress on stderr."""
    import llavakit
    from llavakit.weights.hub import resolve_alias

    name = resolve_alias(args.model)
    print(f"loading {'the demo model' if args.model in (None, 'demo') else name} ...", file=sys.stderr, flush=True)
    return llavakit.load(name, dtype=args.dtype, device=args.device, vision_tower=args.vision_tower,
                         conv_mode=template_override(args), revision=args.revision, fetch_policy=FetchPolicy(),
                         num_frames=getattr(args, "video_frames", None))


def template_override(args: argparse.Namespace) -> str | None:
    """--conv-mode as the checkpoint's template; "raw" is per prompt, not a template."""
    return None if args.conv_mode in (None, "raw") else args.conv_mode
