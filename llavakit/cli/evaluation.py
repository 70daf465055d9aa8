"""`llavakit eval score`: benchmark scores of an answers file (from `llavakit predict`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "score an answers file against a benchmark's annotations (VQAv2, TextVQA, VizWiz, GQA, POPE, MME, ...)"
EXAMPLE = """examples:
  llavakit eval score --task vqav2 --answers answers.jsonl --annotations v2_mscoco_val2014_annotations.json
  llavakit eval score --task pope --answers pope.jsonl --annotations coco_pope_random.json --json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["score"])
    p.add_argument("--task", required=True, help="vqav2, textvqa, vizwiz, gqa, pope, mme, mmbench, scienceqa, seed")
    p.add_argument("--answers", required=True, type=Path, help="answers JSONL (llavakit predict's format)")
    p.add_argument("--annotations", required=True, type=Path, help="the benchmark's annotation file")
    p.add_argument("--json", action="store_true", help="print the result as JSON (with a top-level 'score')")
    p.add_argument("--out", type=Path, help="also write the JSON result here")


def run(args: argparse.Namespace) -> int:
    from llavakit.eval.scorers import format_table, score

    result = score(args.task, args.answers, args.annotations)
    text = json.dumps(result, indent=1, ensure_ascii=False)
    if args.out:
        args.out.write_text(text + "\n")
    print(text if args.json else format_table(result))
    return 0
