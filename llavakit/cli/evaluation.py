"""`llavakit eval score|clip-score|compare|review|summarize`: benchmark scores of an answers file, CLIP scores
of captions, a paired comparison of two caption sets of the same images, and judge-scored reviews (LLaVA-Bench,
LLaVAR) with their relative scores."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from llavakit.cli.checks import check_output, make_parent
from llavakit.cli.common import CliError, HelpFormatter, add_threads_flag, number, set_threads
from llavakit.eval.scorers import TASKS

HELP = "score answers on a benchmark, CLIP-score captions, compare two caption sets, or have a judge review answers"
EXAMPLE = """examples:
  llavakit eval score --task vqav2 --answers answers.jsonl --annotations v2_mscoco_val2014_annotations.json
  llavakit eval clip-score --answers gpu.jsonl --questions q.jsonl --images coco/ --clip-model CLIP-ViT-H-14/ \\
      --output gpu.scores.jsonl
  llavakit eval compare gpu.jsonl npu.jsonl --questions q.jsonl --images coco/ --clip-model CLIP-ViT-H-14/ --plot d.png
  llavakit eval compare gpu.scores.jsonl npu.scores.jsonl --json
  llavakit eval review --questions questions.jsonl --contexts context.jsonl --reference answers_gpt4.jsonl \\
      --answers answers.jsonl --rules rule.json --category-prefix llava_bench_ --out review.jsonl \\
      --judge-url https://api.openai.com/v1 --judge-model gpt-4o
  llavakit eval summarize review.jsonl --ignore 3,17
"""
MAX_SKIP_LINES = 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions = {"score": (_add_score_arguments, run_score, "benchmark score of an answers file"),
               "clip-score": (_add_clip_score_arguments, run_clip_score, "mean and per-item CLIP score of captions"),
               "compare": (_add_compare_arguments, run_compare,
                           "paired CLIP-score difference of two caption sets, with a bootstrap interval"),
               "review": (_add_review_arguments, run_review,
                          "a judge (any OpenAI-compatible chat endpoint) scores answers against reference answers, "
                          "as LLaVA-Bench and LLaVAR do; resumable"),
               "summarize": (_add_summarize_arguments, run_summarize,
                             "mean judge scores and relative score per category of review files")}
    for name, (add, handler, help_text) in actions.items():
        s = sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLE, formatter_class=HelpFormatter)
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        add(s)
        s.set_defaults(eval_handler=handler)


def run(args: argparse.Namespace) -> int:
    return args.eval_handler(args)


def _add_score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=list(TASKS), help="the benchmark whose scoring rule applies")
    p.add_argument("--answers", required=True, type=Path, help="answers JSONL (llavakit predict's format)")
    p.add_argument("--annotations", required=True, type=Path, help="the benchmark's annotation file")
    p.add_argument("--json", action="store_true", help="print the result as JSON (with a top-level 'score')")
    p.add_argument("--out", type=Path, help="also write the JSON result here")


def run_score(args: argparse.Namespace) -> int:
    from llavakit.eval.scorers import format_table, score

    if args.out:
        check_output(args.out, "--out")
    result = score(args.task, args.answers, args.annotations)
    text = json.dumps(result, indent=1, ensure_ascii=False)
    if args.out:
        args.out.write_text(text + "\n")
    print(text if args.json else format_table(result))
    return 0


def _add_judge_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("CLIP judge" + ("" if required else " (only to score answers files)"))
    add_threads_flag(g)
    g.add_argument("--clip-model", type=Path, required=required, metavar="PATH",
                   help="open_clip checkpoint: a folder with open_clip_config.json + weights, or a weights file")
    g.add_argument("--clip-arch", metavar="NAME", help="architecture when the checkpoint has no open_clip_config.json: "
                   "ViT-B-32, ViT-L-14, ViT-H-14, ... (-quickgelu for OpenAI weights), or a model-config JSON")
    g.add_argument("--clip-tokenizer", type=Path, metavar="PATH",
                   help="bpe_simple_vocab_16e6.txt.gz or a Hugging Face CLIP tokenizer folder "
                        "(default: beside the checkpoint, else the copy in an installed open_clip_torch)")
    g.add_argument("--images", "--image-folder", dest="images", type=Path, required=required, metavar="DIR",
                   help="folder the captions' image names are relative to")
    g.add_argument("--questions", type=Path, metavar="FILE",
                   help="question file mapping question_id -> image, for answers without an 'image' field")
    g.add_argument("--batch-size", type=number(int, 1), default=32, help="images or captions per CLIP forward pass")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def _add_clip_score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--answers", required=True, type=Path,
                   help="captions: llavakit predict's answers JSONL, or a JSON object {image: caption}")
    _add_judge_arguments(p, required=True)
    p.add_argument("--output", type=Path, metavar="FILE", help="write per-item scores here (JSONL; compare reads it)")
    p.add_argument("--json", action="store_true", help="print the summary and the per-item scores as JSON")


def _add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", type=Path, metavar="A", help="answers file or per-item score file (the baseline)")
    p.add_argument("b", type=Path, metavar="B", help="answers file or per-item score file (the candidate)")
    _add_judge_arguments(p, required=False)
    p.add_argument("--resamples", type=number(int, 1), default=10_000, help="bootstrap resamples")
    p.add_argument("--confidence", type=number(float, above=0, below=1), default=0.95, help="interval level")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--output", type=Path, metavar="FILE", help="write per-pair scores and differences here (JSONL)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="draw the per-image differences with the interval")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _report_skips(messages: list[str]) -> None:
    for message in messages[:MAX_SKIP_LINES]:
        print(f"skipped: {message}", file=sys.stderr)
    if len(messages) > MAX_SKIP_LINES:
        print(f"skipped: ... and {len(messages) - MAX_SKIP_LINES} more", file=sys.stderr)


def _judge(args: argparse.Namespace):
    import torch

    from llavakit.eval.clip_judge import load_judge

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {device}: CUDA is not available here; use --device cpu")
    print(f"loading CLIP judge {args.clip_model} ...", file=sys.stderr, flush=True)
    return load_judge(args.clip_model, args.clip_arch, args.clip_tokenizer, device)


def _items(args: argparse.Namespace, answers: Path):
    """The captions of `answers` that have an image file; an error when none has."""
    from llavakit.eval.clip_score import attach_images, read_captions, read_image_map

    captions = read_captions(answers)
    image_map = read_image_map(args.questions) if args.questions else None
    items, skipped = attach_images(captions, image_map, args.images)
    _report_skips(skipped)
    if not items:
        raise CliError(f"nothing to score in {answers}: none of its {len(captions)} captions has an image file"
                       + (f" (first: {skipped[0]})" if skipped else ""))
    return items, len(skipped)


def _score(args: argparse.Namespace, judge, items, skipped: int, cache: dict) -> tuple[list[dict], int]:
    from llavakit.eval.clip_score import score_items

    rows, bad = score_items(judge, items, args.batch_size, image_cache=cache)
    _report_skips(bad)
    if not rows:
        raise CliError(f"no image could be read ({len(bad)} failed; first: {bad[0]})")
    return rows, skipped + len(bad)


def run_clip_score(args: argparse.Namespace) -> int:
    set_threads(args)
    from llavakit.eval.clip_score import summarize, write_jsonl
    from llavakit.eval.scorers import format_table

    if args.output:
        check_output(args.output, "--output", makedirs=True)
    items, skipped = _items(args, args.answers)
    rows, skipped = _score(args, _judge(args), items, skipped, {})
    summary = summarize(rows, skipped)
    if args.output:
        write_jsonl(rows, args.output)
    print(json.dumps({**summary, "items": rows}, indent=1, ensure_ascii=False) if args.json else format_table(summary))
    return 0


def _scores(args: argparse.Namespace, paths: list[Path]) -> list[dict[str, dict]]:
    """Per-item scores of each file: read from a score file, or computed (one judge for all answers files)."""
    from llavakit.eval.clip_score import is_score_file, read_scores

    judge, cache, out = None, {}, []
    for path in paths:
        if is_score_file(path):
            out.append(read_scores(path))
            continue
        if args.clip_model is None or args.images is None:
            raise CliError(f"{path} is an answers file: pass --clip-model and --images to score it, or compare the "
                           "per-item files written by `llavakit eval clip-score --output`")
        items, skipped = _items(args, path)
        judge = judge or _judge(args)
        rows, _ = _score(args, judge, items, skipped, cache)
        out.append({str(r["question_id"]): r for r in rows})
    return out


def run_compare(args: argparse.Namespace) -> int:
    set_threads(args)
    from llavakit.eval.clip_score import write_jsonl
    from llavakit.eval.compare import (
        compare_scores,
        format_comparison,
        plot_differences,
    )

    if args.output:
        check_output(args.output, "--output", makedirs=True)
    if args.plot:
        check_output(args.plot, "--plot")
    scores_a, scores_b = _scores(args, [args.a, args.b])
    summary, pairs = compare_scores(scores_a, scores_b, args.resamples, args.confidence, args.seed)
    result = {"a": str(args.a), "b": str(args.b), **summary}
    if args.output:
        write_jsonl(pairs, args.output)
    if args.plot:
        plot_differences([p["difference"] for p in pairs], result, args.plot, (args.a.name, args.b.name))
    print(json.dumps(result, indent=1) if args.json else format_comparison(result, str(args.a), str(args.b)))
    return 0


def _judge_url(text: str) -> str:
    if not text.lower().startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return text


def _add_review_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inputs (the original's files as they are)")
    g.add_argument("--questions", required=True, type=Path, metavar="FILE",
                   help="questions JSONL: {question_id, image, text, category} per line")
    g.add_argument("--contexts", "--context", dest="contexts", required=True, type=Path, metavar="FILE",
                   help="the judge's view of each image, JSONL: {image, captions or caption, optional instances "
                        "[{category, bbox}]} per line")
    g.add_argument("--reference", required=True, type=Path, metavar="FILE",
                   help="reference answers JSONL (e.g. GPT-4's), shown to the judge as Assistant 1")
    g.add_argument("--answers", required=True, type=Path, metavar="FILE",
                   help="the model's answers (llavakit predict's JSONL), shown to the judge as Assistant 2")
    g.add_argument("--rules", "--rule", dest="rules", required=True, type=Path, metavar="FILE",
                   help="rules JSON {category: {role, prompt}} (LLaVA's llava/eval/table/rule.json, LLaVAR's "
                        "rule_read_v3.json)")
    g.add_argument("--category-prefix", metavar="TEXT",
                   help="put before each question's category to find its rule and label its review: "
                        "llava_bench_ for LLaVA-Bench In-the-Wild (as eval_gpt_review_bench.py does)")
    p.add_argument("--out", required=True, type=Path, metavar="FILE",
                   help="review JSONL, appended to: questions already in it are not asked again")
    j = p.add_argument_group("judge")
    j.add_argument("--judge-url", type=_judge_url, default="https://api.openai.com/v1", metavar="URL",
                   help="OpenAI-compatible base URL (a vLLM or `llavakit serve` server: http://HOST:PORT/v1)")
    j.add_argument("--judge-model", required=True, metavar="NAME", help="the judge model's name at that endpoint")
    j.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the API key (unset: no key is sent)")
    j.add_argument("--concurrency", type=number(int, 1, 256), default=4, help="requests in flight at once")
    j.add_argument("--retries", type=number(int, 0), default=5,
                   help="tries again after a rate limit (429), a server error (5xx), a timeout or a dropped "
                        "connection")
    j.add_argument("--backoff", type=number(float, 0), default=1.0, metavar="SECONDS",
                   help="wait before the first retry, doubled at each one (longer when the server asks, at most 60)")
    j.add_argument("--timeout", type=number(float, above=0), default=120.0, metavar="SECONDS",
                   help="longest wait for each read of a reply")
    j.add_argument("--temperature", type=number(float, 0, 2), default=0.0,
                   help="judge sampling temperature (the original used 0.2)")
    j.add_argument("--max-tokens", type=number(int, 1), default=1024, help="longest judge reply")


def run_review(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from llavakit.eval.review import JudgeClient, JudgeError, build_items, reviewed_ids, run_reviews
    from llavakit.eval.summarize import format_summary, review_name, summarize_file

    check_output(args.out, "--out", makedirs=True)
    items = build_items(args.questions, args.contexts, args.reference, args.answers, args.rules,
                        args.category_prefix or "")
    api_key = os.environ.get(args.api_key_env) or None
    if api_key is None:
        print(f"note: ${args.api_key_env} is not set: the judge is asked without an API key", file=sys.stderr)
    client = JudgeClient(args.judge_url, args.judge_model, api_key, timeout=args.timeout, retries=args.retries,
                         backoff=args.backoff, temperature=args.temperature, max_tokens=args.max_tokens)
    make_parent(args.out, "--out")
    done = reviewed_ids(args.out)
    initial = sum(str(item.row["question_id"]) in done for item in items)
    with tqdm(total=len(items), initial=initial, desc="review", unit="q", disable=None) as bar:
        try:
            counts = run_reviews(items, client, args.out, args.concurrency, on_review=lambda _: bar.update())
        except JudgeError as e:
            raise CliError(str(e)) from None
    print(f"reviewed {counts.asked} now, {counts.done_before} already in {args.out}; {counts.unscored} replies had "
          "no score pair (recorded as [-1, -1])", file=sys.stderr)
    print(format_summary(review_name(args.out), summarize_file(args.out)))
    return 0


def _add_summarize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("reviews", nargs="+", type=Path, metavar="REVIEW.jsonl", help="review files (llavakit's or LLaVA's)")
    p.add_argument("--ignore", action="append", default=[], metavar="IDS",
                   help="question ids to leave out, comma-separated (repeatable)")
    p.add_argument("--json", action="store_true", help="print {file: {category: scores}} as JSON")


def run_summarize(args: argparse.Namespace) -> int:
    from llavakit.eval.summarize import format_summary, review_name, summarize_file

    ignore = {i.strip() for text in args.ignore for i in text.split(",") if i.strip()}
    summaries = {str(path): summarize_file(path, ignore) for path in args.reviews}
    if args.json:
        print(json.dumps(summaries, indent=1))
    else:
        print("\n\n".join(format_summary(review_name(path), summary) for path, summary in summaries.items()))
    return 0
