"""`llavakit`: one command for chatting with, prompting and batch-predicting LLaVA models.

Exit codes: 0 success, 2 usage error, 1 runtime error (one line on stderr; --debug shows the traceback).
"""

from __future__ import annotations

import argparse
import sys

from llavakit import __version__
from llavakit.cli import (
    bench,
    chat,
    convert,
    demo,
    evaluation,
    generate,
    ground,
    merge_lora,
    predict,
    prompt,
    random_checkpoint,
    serve,
    train,
)
from llavakit.cli.common import USER_ERRORS, CliError, HelpFormatter, UsageError, error_line

EPILOG = """examples:
  llavakit chat --model llava-hf/llava-1.5-7b-hf --image photo.jpg
  llavakit generate --model ./llava-v1.6-vicuna-7b --image photo.jpg --prompt "What is this?" --json
  llavakit predict --model llava-1.5-7b --questions q.jsonl --image-folder images/ --answers a.jsonl
  llavakit prompt --model llava-1.5-7b "What is in the picture?"
  llavakit train --stage lora --model llava-1.5-7b --data-path data.json --image-folder imgs/ --output-dir out
  llavakit merge-lora --base llava-1.5-7b --lora out/final --out merged/
  llavakit convert --model llava-1.5-7b --out llava-1.5-7b-w4a16 --quantization w4a16
  llavakit serve --model llava-1.5-7b --port 8000
"""

SUBCOMMANDS = {"chat": chat, "generate": generate, "predict": predict, "prompt": prompt, "train": train,
               "merge-lora": merge_lora, "convert": convert, "demo": demo, "bench": bench, "eval": evaluation,
               "ground": ground, "serve": serve, "random-checkpoint": random_checkpoint}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llavakit", description="LLaVA-family vision-language models.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"llavakit {__version__}",
                        help="print llavakit's version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, epilog=module.EXAMPLE,
                           formatter_class=HelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (CliError, *USER_ERRORS) as e:
        if args.debug:
            raise
        print(f"llavakit: error: {error_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1

