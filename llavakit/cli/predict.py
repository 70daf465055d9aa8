"""`llavakit predict`: answer a question file in the LLaVA `model_vqa` format, resumably.

Questions (JSON lines): {"question_id", "image"?, "text", ...}. Answers (JSON lines, appended):
{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}. Ids already in the answers file
are skipped, so an interrupted run continues where it stopped; a bad row or image is reported,
skipped and counted, never fatal.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import uuid
from pathlib import Path

from tqdm.auto import tqdm

from llavakit.cli.checks import check_output, make_parent
from llavakit.cli.common import CliError, add_model_flags, add_sampling_flags, load_pipeline, sampling_kwargs
from llavakit.datafiles import parse_jsonl, read_text
from llavakit.eval.answers import ANSWERS_FORMAT

HELP = "answer a question file (model_vqa JSONL format), resumable, chunkable"
QUESTIONS_FORMAT = "a model_vqa question file: one {\"question_id\", \"text\", optional \"image\"} object per line"

# What LLaVA's evaluation scripts append to each benchmark's questions.
_SHORT = "Answer the question using a single word or phrase."
PROMPT_SUFFIXES = {
    "vqav2": _SHORT, "gqa": _SHORT, "textvqa": _SHORT, "pope": _SHORT, "mme": _SHORT,
    "vizwiz": "When the provided information is insufficient, respond with 'Unanswerable'. " + _SHORT,
    "mmbench": "Answer with the option's letter from the given choices directly.",
    "scienceqa": "Answer with the option's letter from the given choices directly.",
    "seed": "Answer with the option's letter from the given choices directly.",
}
EXAMPLE = """examples:
  llavakit predict --model llava-1.5-7b --questions q.jsonl --image-folder images/ --answers a.jsonl
  llavakit predict --model DIR --questions q.jsonl --image-folder images/ --answers a.2.jsonl \\
      --num-chunks 4 --chunk-idx 2
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p)
    p.add_argument("--questions", "--question-file", dest="questions", required=True, type=Path, metavar="FILE",
                   help="question file: one {\"question_id\", \"text\", optional \"image\"} object per line")
    p.add_argument("--image-folder", type=Path, default=Path("."), help="where the questions' images are")
    p.add_argument("--answers", "--answers-file", dest="answers", required=True, type=Path, metavar="FILE",
                   help="answers JSONL, appended to: ids already in it are skipped (its folder is created)")
    p.add_argument("--num-chunks", type=int, default=1, help="split the questions into this many chunks")
    p.add_argument("--chunk-idx", type=int, default=0, help="which chunk this run answers (0-based)")
    p.add_argument("--model-id", help="model_id written to each answer (default: the model's name)")
    p.add_argument("--benchmark", choices=sorted(PROMPT_SUFFIXES),
                   help="append that benchmark's instruction to every question, as LLaVA's eval scripts do")
    p.add_argument("--prompt-suffix", help="text appended to every question (on a new line)")
    add_sampling_flags(p)
    p.set_defaults(temperature=0.0, max_new_tokens=128)


def read_questions(path: Path) -> tuple[list[dict], list[str]]:
    """Rows that parse, and a message for each line that does not."""
    if not path.exists():
        raise CliError(f"question file {path} (--questions) does not exist")
    rows, problems = [], []
    for n, line in enumerate(read_text(path, QUESTIONS_FORMAT).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{n}: not valid JSON ({e.msg})")
            continue
        if not isinstance(row, dict) or "question_id" not in row or not isinstance(row.get("text"), str):
            problems.append(f"{path}:{n}: a question needs 'question_id' and a 'text' string")
            continue
        rows.append(row)
    return rows, problems


def get_chunk(rows: list, num_chunks: int, index: int) -> list:
    """Chunk `index` of `num_chunks` near-equal consecutive chunks (as LLaVA's eval scripts split)."""
    if num_chunks < 1 or not 0 <= index < num_chunks:
        raise CliError(f"--chunk-idx must be in [0, {num_chunks}) and --num-chunks >= 1")
    size = math.ceil(len(rows) / num_chunks) if rows else 0
    return rows[index * size:(index + 1) * size]


def answered_ids(path: Path) -> set:
    """question_ids already answered; a line cut off by an interrupted run is removed first."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        path.write_bytes(data)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise CliError(f"answers file {path} (--answers) is not UTF-8 text; pass a new --answers file") from None
    expected = f"{ANSWERS_FORMAT}; fix or remove that line, or pass a new --answers file"
    return {row["question_id"] for row in parse_jsonl(text, str(path), expected)}


def answer_id(model_id: str, question_id, text: str) -> str:
    """Deterministic, so a resumed run writes the same file as an uninterrupted one."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{model_id}/{question_id}/{text}").hex


def _answer(pipe, row: dict, args) -> dict:
    images = [str(args.image_folder / row["image"])] if row.get("image") else []
    sampling = sampling_kwargs(args)
    if sampling["seed"] is None and sampling["temperature"] > 0:  # per-question seed keeps resumes identical
        sampling["seed"] = uuid.uuid5(uuid.NAMESPACE_URL, str(row["question_id"])).int % 2**31
    return pipe.generate(question_text(row["text"], args), images=images, conv_mode=args.conv_mode, **sampling)


def question_text(text: str, args: argparse.Namespace) -> str:
    """The question with the benchmark's instruction (or --prompt-suffix) on a new line."""
    suffix = args.prompt_suffix or PROMPT_SUFFIXES.get(args.benchmark or "")
    return f"{text}\n{suffix}" if suffix else text


def run(args: argparse.Namespace) -> int:
    rows, problems = read_questions(args.questions)
    for message in problems:
        print(f"skipped: {message}", file=sys.stderr)
    chunk = get_chunk(rows, args.num_chunks, args.chunk_idx)
    check_output(args.answers, "--answers", makedirs=True)  # its folder is created, as LLaVA's model_vqa does
    done = answered_ids(args.answers)
    todo = [r for r in chunk if r["question_id"] not in done]
    make_parent(args.answers, "--answers")
    pipe = load_pipeline(args)
    model_id = args.model_id or Path(str(args.model).rstrip("/")).name
    skipped = len(problems)
    with args.answers.open("a") as f:
        for row in tqdm(todo, desc="predict", unit="q", disable=None):
            try:
                out = _answer(pipe, row, args)
            except (ValueError, OSError) as e:
                skipped += 1
                print(f"skipped question {row['question_id']}: {str(e).splitlines()[0]}", file=sys.stderr)
                continue
            record = {"question_id": row["question_id"], "prompt": row["text"], "text": out.text.strip(),
                      "answer_id": answer_id(model_id, row["question_id"], out.text),
                      "model_id": model_id,
                      "metadata": {"finish_reason": out.finish_reason, "prompt_tokens": len(out.prompt_token_ids),
                                   "completion_tokens": len(out.token_ids)}}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
    print(f"answered {len(todo) - (skipped - len(problems))}, already done {len(chunk) - len(todo)}, "
          f"skipped {skipped}", file=sys.stderr)
    return 0
