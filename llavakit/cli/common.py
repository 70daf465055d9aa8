"""Flags and helpers shared by the subcommands: model selection, sampling, one-line errors."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from llavakit.config import ASPECT_RATIO_HELP, IMAGE_ASPECT_RATIOS
from llavakit.processing.media import FetchPolicy

# Errors a user can fix: printed as one line (exit 1); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, KeyError)
# More CPU threads than this rarely help a decode step: its matrices are small and OpenMP's barriers are not.
MAX_DEFAULT_THREADS = 16


class CliError(Exception):
    """A runtime problem to report as one line."""


def error_line(e: BaseException) -> str:
    """The one line an error is reported as: its message's first line; a KeyError says which key is missing
    (its own text is only the key's repr), an error without a message says what kind it is."""
    if isinstance(e, KeyError) and len(e.args) == 1:
        return f"missing key {e.args[0]!r}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class UsageError(CliError):
    """Flags that cannot work together or a missing choice, found after parsing: one line, exit 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Epilog examples kept as written, and each option's default shown, unless there is none worth showing
    (None, False, an empty list) or its help already speaks of its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default is None or default is False or default == []:
            return text
        return super()._get_help_string(action)


def add_model_flags(p: argparse.ArgumentParser, required: bool = True, quantization: bool = True) -> None:
    """--model and how it loads; `quantization`: also the quantization flags (commands that load weights)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", "--model-path", dest="model", required=required, metavar="M",
                   help="checkpoint directory, hub id (org/name) or alias such as llava-1.5-7b"
                        + ("" if required else "; default: the built-in demo model"))
    g.add_argument("--revision", help="hub revision (branch, tag or commit)")
    g.add_argument("--vision-tower", metavar="DIR",
                   help="local CLIP directory for original checkpoints whose tower is not inside")
    g.add_argument("--conv-mode", metavar="NAME",
                   help="conversation template (vicuna_v1, llava_v1, mistral_instruct, chatml_direct, ...)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights and compute dtype (auto: float16 on CUDA, float32 on CPU)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    if quantization:
        add_quantization_flags(g)
        add_parallel_flag(g)
    add_image_aspect_ratio_flag(g)
    add_threads_flag(g)


QUANTIZATION_METHODS = ("w8a16", "w4a16")  # llavakit.quant.METHODS, without importing torch to build the parser


def add_quantization_flags(g) -> None:
    """--quantization, --group-size, --quantize-lm-head: weight-only quantization of the language model."""
    g.add_argument("--quantization", "-q", choices=QUANTIZATION_METHODS,
                   help="quantize the language model's weights as they load: w8a16 (int8, one scale per output "
                        "channel) or w4a16 (int4, one scale per --group-size inputs); the vision tower and "
                        "projector stay in float. A compressed-tensors checkpoint is quantized already: no flag")
    g.add_argument("--group-size", type=number(int, 8), metavar="N",
                   help="inputs sharing one scale (a multiple of 8 that divides the layers' widths; default: 128 "
                        "for w4a16, per output channel for w8a16)")
    g.add_argument("--quantize-lm-head", action="store_true",
                   help="quantize the LM head too (default: it stays in float, like the embeddings)")


def add_parallel_flag(g) -> None:
    """--tensor-parallel-size: one model over N devices (N processes on the CPU)."""
    g.add_argument("--tensor-parallel-size", "-tp", type=number(int, 1), default=1, metavar="N",
                   help="split the language model over N GPUs (on the CPU: N processes); llavakit starts the "
                        "workers itself, or uses those of `torchrun --nproc-per-node N -m llavakit ...`")


def quantization_arg(args: argparse.Namespace):
    """The QuantConfig the quantization flags ask for (None: float); --group-size or --quantize-lm-head without
    --quantization is a usage error."""
    method = getattr(args, "quantization", None)
    if method is None:
        if getattr(args, "group_size", None) is not None or getattr(args, "quantize_lm_head", False):
            raise UsageError("--group-size and --quantize-lm-head need --quantization w8a16 or w4a16")
        return None
    from llavakit.quant.config import QuantConfig

    try:
        return QuantConfig(method, args.group_size, args.quantize_lm_head)
    except ValueError as e:
        raise UsageError(f"--group-size: {e}") from None


def add_image_aspect_ratio_flag(g) -> None:
    """--image-aspect-ratio: how images are preprocessed, overriding what the checkpoint's files say."""
    g.add_argument("--image-aspect-ratio", choices=IMAGE_ASPECT_RATIOS,
                   help=f"image preprocessing instead of the checkpoint's own (the default). {ASPECT_RATIO_HELP} "
                        "(NeXT checkpoints only; pad/crop on them give one view instead of tiles). llava-hf "
                        "LLaVA-1.5 repos crop unless told: use pad to get LLaVA-1.5's published behaviour")


def add_threads_flag(g) -> None:
    """--threads: torch's CPU threads, set before the model loads (see default_threads)."""
    g.add_argument("--threads", type=number(int, 1), metavar="N",
                   help="CPU threads for torch (torch.set_num_threads), set before loading. Default: "
                        "$OMP_NUM_THREADS when set, else half the CPUs this process may use, at least 1 and at "
                        f"most {MAX_DEFAULT_THREADS} (too many threads on busy cores slow decoding sharply: "
                        "3.8 tokens/s with 2 threads against 314 with 1 on a loaded 2-core box)")


def number(kind: type, minimum: float | None = None, maximum: float | None = None, *, above: float | None = None,
           below: float | None = None, note: str = "") -> Callable[[str], float]:
    """An argparse type: a `kind` (int or float) within [minimum, maximum] (`above` / `below`: strict bounds),
    else a usage error that states the range, e.g. "argument --top-p: must be in (0, 1], got 2"."""
    wanted = _range_text(minimum, maximum, above, below) + (f" ({note})" if note else "")

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'} "
                                             f"{wanted}, got {text!r}") from None
        ok = not (isinstance(value, float) and math.isnan(value))
        ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
        if not (ok and (above is None or value > above) and (below is None or value < below)):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _range_text(minimum, maximum, above, below) -> str:
    """">= 0", "> 0", "in (0, 1]", ... for the bounds given."""
    low = f"[{minimum:g}" if minimum is not None else f"({above:g}" if above is not None else None
    high = f"{maximum:g}]" if maximum is not None else f"{below:g})" if below is not None else None
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f"{'>=' if minimum is not None else '>'} {low[1:]}"
    return f"{'<=' if maximum is not None else '<'} {high[:-1]}"


def default_threads() -> int:
    """$OMP_NUM_THREADS when it is a positive integer (the user chose), else half the CPUs this process may
    run on, between 1 and MAX_DEFAULT_THREADS: torch's own default (every core) oversubscribes busy or
    hyper-threaded machines, and an oversubscribed OpenMP decode step can be ~80x slower."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus // 2, MAX_DEFAULT_THREADS))


def set_threads(args: argparse.Namespace) -> int:
    """torch.set_num_threads(--threads, else default_threads()); call before loading a model. Returns N."""
    import torch

    n = getattr(args, "threads", None) or default_threads()
    torch.set_num_threads(n)
    return n


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Sampling flags; values out of range are usage errors (exit 2), refused before any model loads."""
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=number(float, 0), default=0.2, metavar="T",
                   help="0 is greedy; LLaVA's own CLI samples at 0.2")
    g.add_argument("--top-p", type=number(float, above=0, maximum=1), default=1.0, metavar="P",
                   help="nucleus sampling: keep the most likely tokens up to this probability mass (1: off)")
    g.add_argument("--top-k", type=number(int, 0), default=0, metavar="K",
                   help="keep the K most likely tokens (0: off)")
    g.add_argument("--repetition-penalty", type=number(float, above=0), default=1.0, metavar="R",
                   help="penalty on tokens already in the prompt or output (transformers' rule; 1: off)")
    g.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=number(int, 1), default=512,
                   metavar="N", help="tokens to generate at most")
    g.add_argument("--seed", type=int, help="sampling seed (default: random)")
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
    quantization = quantization_arg(args)  # a usage error before anything loads
    set_threads(args)
    print(f"loading {'the demo model' if args.model in (None, 'demo') else name} ...", file=sys.stderr, flush=True)
    return llavakit.load(name, dtype=args.dtype, device=args.device, vision_tower=args.vision_tower,
                         conv_mode=template_override(args), revision=args.revision, fetch_policy=FetchPolicy(),
                         num_frames=getattr(args, "video_frames", None), image_aspect_ratio=args.image_aspect_ratio,
                         quantization=quantization, tensor_parallel_size=getattr(args, "tensor_parallel_size", 1))


def template_override(args: argparse.Namespace) -> str | None:
    """--conv-mode as the checkpoint's template; "raw" is per prompt, not a template."""
    return None if args.conv_mode in (None, "raw") else args.conv_mode
