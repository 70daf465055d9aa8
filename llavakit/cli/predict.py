"""`llavakit predict`: answer a question file in the LLaVA `model_vqa` format, resumably, in this process or on
a Ray cluster (`--ray`: many replicas, many machines; llavakit/scale/ray_predict.py).

Questions (JSON lines): {"question_id", "image"?, "text", ...}. Answers (JSON lines, appended):
{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}. Ids already in the answers file
are skipped, so an interrupted run continues where it stopped; a bad row or image is reported,
skipped and counted, never fatal.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from tqdm.auto import tqdm

from llavakit.cli.checks import check_output, make_parent
from llavakit.cli.common import (
    CliError,
    UsageError,
    add_model_flags,
    add_sampling_flags,
    load_pipeline,
    number,
    quantization_arg,
    sampling_kwargs,
    template_override,
)
from llavakit.processing.media import FetchPolicy
from llavakit.scale.questions import (
    PROMPT_SUFFIXES,
    answer_line,
    answer_record,
    answered_ids,
    image_sources,
    problem_line,
    question_seed,
    question_text,
    read_questions,
)

HELP = "answer a question file (model_vqa JSONL format), resumable, chunkable, or on a Ray cluster"
EXAMPLE = """examples:
  llavakit predict --model llava-1.5-7b --questions q.jsonl --image-folder images/ --answers a.jsonl
  llavakit predict --model DIR --questions q.jsonl --image-folder images/ --answers a.2.jsonl \\
      --num-chunks 4 --chunk-idx 2
  llavakit predict --model llava-1.5-7b --questions q.jsonl --image-folder /shared/images --answers a.jsonl \\
      --ray --num-replicas 8 --gpus-per-replica 1
"""
RAY_FLAGS = ("ray_address", "num_replicas", "gpus_per_replica", "batch_size")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--questions", "--question-file", dest="questions", required=True, type=Path, metavar="FILE",
                   help="question file: one {\"question_id\", \"text\", optional \"image\"} object per line")
    p.add_argument("--image-folder", type=Path, default=Path("."),
                   help="where the questions' images are (an image that is an http(s) URL is fetched instead)")
    p.add_argument("--answers", "--answers-file", dest="answers", required=True, type=Path, metavar="FILE",
                   help="answers JSONL, appended to: ids already in it are skipped (its folder is created)")
    p.add_argument("--num-chunks", type=int, default=1, help="split the questions into this many chunks")
    p.add_argument("--chunk-idx", type=int, default=0, help="which chunk this run answers (0-based)")
    p.add_argument("--model-id", help="model_id written to each answer (default: the model's name)")
    p.add_argument("--benchmark", choices=sorted(PROMPT_SUFFIXES),
                   help="append that benchmark's instruction to every question, as LLaVA's eval scripts do")
    p.add_argument("--prompt-suffix", help="text appended to every question (on a new line)")
    add_sampling_flags(p)
    add_ray_flags(p)
    p.set_defaults(temperature=0.0, max_new_tokens=128)


def add_ray_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ray (pip install 'ray[data]'; docs/scale.md)")
    g.add_argument("--ray", action="store_true",
                   help="answer on a Ray cluster: replicas of the model each read their own questions' images "
                        "(paths every node sees, or URLs); the answers file is the same")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="the cluster (default: $RAY_ADDRESS, else a local cluster started for this run)")
    g.add_argument("--num-replicas", type=number(int, 1), metavar="N", help="model replicas (default: 1)")
    g.add_argument("--gpus-per-replica", type=number(float, 0), metavar="G",
                   help="GPUs Ray gives each replica (default: 0: CPU replicas); with --tensor-parallel-size N, N")
    g.add_argument("--batch-size", type=number(int, 1), metavar="N",
                   help="questions handed to a replica at a time, answered as one continuous batch (default: 16)")


def get_chunk(rows: list, num_chunks: int, index: int) -> list:
    """Chunk `index` of `num_chunks` near-equal consecutive chunks (as LLaVA's eval scripts split)."""
    if num_chunks < 1 or not 0 <= index < num_chunks:
        raise CliError(f"--chunk-idx must be in [0, {num_chunks}) and --num-chunks >= 1")
    size = math.ceil(len(rows) / num_chunks) if rows else 0
    return rows[index * size:(index + 1) * size]


def model_id(args: argparse.Namespace) -> str:
    return args.model_id or Path(str(args.model).rstrip("/")).name


def _answer(pipe, row: dict, args) -> dict:
    sampling = sampling_kwargs(args)
    if sampling["seed"] is None and sampling["temperature"] > 0:  # per-question seed keeps resumes identical
        sampling["seed"] = question_seed(row["question_id"])
    out = pipe.generate(question_text(row["text"], suffix(args)), images=image_sources(row, args.image_folder),
                        conv_mode=args.conv_mode, **sampling)
    return answer_record(row, model_id(args), out.text, out.finish_reason, len(out.prompt_token_ids),
                         len(out.token_ids))


def suffix(args: argparse.Namespace) -> str | None:
    """--prompt-suffix, else the --benchmark's instruction."""
    return args.prompt_suffix or PROMPT_SUFFIXES.get(args.benchmark or "")


def run(args: argparse.Namespace) -> int:
    check_ray_flags(args)
    if not args.questions.exists():
        raise CliError(f"question file {args.questions} (--questions) does not exist")
    rows, problems = read_questions(args.questions)
    for message in problems:
        print(f"skipped: {message}", file=sys.stderr)
    chunk = get_chunk(rows, args.num_chunks, args.chunk_idx)
    check_output(args.answers, "--answers", makedirs=True)  # its folder is created, as LLaVA's model_vqa does
    done = answered_ids(args.answers, "--answers")
    todo = [r for r in chunk if r["question_id"] not in done]
    make_parent(args.answers, "--answers")
    answered, skipped = (run_ray if args.ray else run_here)(args, todo) if todo else (0, 0)
    print(f"answered {answered}, already done {len(chunk) - len(todo)}, skipped {skipped + len(problems)}",
          file=sys.stderr)
    return 0


def run_here(args: argparse.Namespace, todo: list[dict]) -> tuple[int, int]:
    """Answer `todo` in this process; (answered, skipped)."""
    pipe = load_pipeline(args)
    skipped = 0
    with args.answers.open("a") as f:
        for row in tqdm(todo, desc="predict", unit="q", disable=None):
            try:
                record = _answer(pipe, row, args)
            except (ValueError, OSError) as e:
                skipped += 1
                print(f"skipped question {row['question_id']}: {problem_line(e)}", file=sys.stderr)
                continue
            f.write(answer_line(record))
            f.flush()
    return len(todo) - skipped, skipped


def check_ray_flags(args: argparse.Namespace) -> None:
    """Ray's flags only with --ray, and enough GPUs for each replica's --tensor-parallel-size."""
    given = [f"--{name.replace('_', '-')}" for name in RAY_FLAGS if getattr(args, name) is not None]
    if given and not args.ray:
        raise UsageError(f"{', '.join(given)} {'need' if len(given) > 1 else 'needs'} --ray")
    gpus = args.gpus_per_replica or 0
    if 0 < gpus < args.tensor_parallel_size:
        raise UsageError(f"--tensor-parallel-size {args.tensor_parallel_size} needs at least that many "
                         f"--gpus-per-replica, got {gpus:g}")


def run_ray(args: argparse.Namespace, todo: list[dict]) -> tuple[int, int]:
    """Answer `todo` on a Ray cluster (--ray-address, else $RAY_ADDRESS, else a local one); (answered, skipped)."""
    from llavakit.sampling import SamplingParams
    from llavakit.scale.ray_predict import INSTALL_HINT, PredictSettings, predict_dataset
    from llavakit.weights.hub import resolve_alias

    sampling = sampling_kwargs(args)
    settings = PredictSettings(
        model=resolve_alias(args.model), llm_kwargs=llm_kwargs(args),
        sampling=SamplingParams(max_tokens=sampling.pop("max_new_tokens"), **sampling),
        image_folder=str(args.image_folder), prompt_suffix=suffix(args), conv_mode=args.conv_mode,
        model_id=model_id(args), tensor_parallel_size=args.tensor_parallel_size, threads=args.threads or 1)
    try:
        import ray
        import ray.data
    except ImportError:
        raise CliError(INSTALL_HINT) from None
    if not ray.is_initialized():
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts questions and their rate
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its failures reach us as exceptions
    try:
        batch_size = args.batch_size or 16
        questions = ray.data.from_items([{"question": json.dumps(row)} for row in todo],  # any ids, any fields
                                        override_num_blocks=math.ceil(len(todo) / batch_size))  # all replicas busy
        counts = predict_dataset(questions, args.answers, settings, num_replicas=args.num_replicas or 1,
                                 gpus_per_replica=args.gpus_per_replica or 0, batch_size=batch_size, total=len(todo))
    except ray.exceptions.RayError as e:
        raise CliError(f"a replica failed: {replica_error(e)}") from e
    return counts.answered, counts.skipped


def replica_error(e: BaseException) -> str:
    """The replica's own error in a Ray error: Ray puts the remote traceback in the message, whose last line is
    "module.ErrorClass: what went wrong"; the part after the class name is what the user can act on."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    last = lines[-1] if lines else type(e).__name__
    name, sep, message = last.partition(": ")
    return message if sep and " " not in name else last


def llm_kwargs(args: argparse.Namespace) -> dict:
    """`llavakit.LLM`'s keywords for the model flags, as `load_pipeline` loads the model in one process."""
    return dict(dtype=args.dtype, device=args.device, vision_tower=args.vision_tower, conv_mode=template_override(args),
                revision=args.revision, fetch_policy=FetchPolicy(), image_aspect_ratio=args.image_aspect_ratio,
                quantization=quantization_arg(args))
