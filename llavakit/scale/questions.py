"""The model_vqa question and answer files of `llavakit predict`, one definition for the one-process run and the
Ray one (llavakit/scale/ray_predict.py): reading questions, the prompt and images of a question, the answer
record, and which questions an answers file already holds (what makes both runs resumable).

Questions (JSON lines): {"question_id", "image"?, "text", ...}. Answers (JSON lines, appended):
{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from llavakit.datafiles import parse_jsonl, read_text
from llavakit.processing.media import is_url

QUESTIONS_FORMAT = "a model_vqa question file: one {\"question_id\", \"text\", optional \"image\"} object per line"
ANSWERS_FORMAT = "llavakit predict's answers: one {\"question_id\", \"text\"} object per line (model_vqa JSONL)"

# What LLaVA's evaluation scripts append to each benchmark's questions.
_SHORT = "Answer the question using a single word or phrase."
PROMPT_SUFFIXES = {
    "vqav2": _SHORT, "gqa": _SHORT, "textvqa": _SHORT, "pope": _SHORT, "mme": _SHORT,
    "vizwiz": "When the provided information is insufficient, respond with 'Unanswerable'. " + _SHORT,
    "mmbench": "Answer with the option's letter from the given choices directly.",
    "scienceqa": "Answer with the option's letter from the given choices directly.",
    "seed": "Answer with the option's letter from the given choices directly.",
}


def question_problem(row: Any) -> str | None:
    """Why `row` is not a question, or None when it is one."""
    if not isinstance(row, dict) or "question_id" not in row or not isinstance(row.get("text"), str):
        return "a question needs 'question_id' and a 'text' string"
    return None


def read_questions(path: Path) -> tuple[list[dict], list[str]]:
    """Rows that parse, and a message (file:line: what is wrong) for each line that does not."""
    rows, problems = [], []
    for n, line in enumerate(read_text(path, QUESTIONS_FORMAT).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{n}: not valid JSON ({e.msg})")
            continue
        problem = question_problem(row)
        if problem:
            problems.append(f"{path}:{n}: {problem}")
            continue
        rows.append(row)
    return rows, problems


def answered_ids(path: Path, flag: str | None = None) -> set:
    """question_ids already answered; a line cut off by an interrupted run is removed first. `flag`: the command-line
    option that named the file, for the error messages."""
    named = f" ({flag})" if flag else ""
    new = f"a new {flag} file" if flag else "a new answers file"
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        path.write_bytes(data)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ValueError(f"answers file {path}{named} is not UTF-8 text; pass {new}") from None
    expected = f"{ANSWERS_FORMAT}; fix or remove that line, or pass {new}"
    return {row["question_id"] for row in parse_jsonl(text, str(path), expected)}


def question_text(text: str, suffix: str | None) -> str:
    """The question with the benchmark's instruction (or any suffix) on a new line."""
    return f"{text}\n{suffix}" if suffix else text


def image_sources(row: dict, image_folder: str | Path) -> list[str]:
    """The question's image: a path under `image_folder`, or a URL as it is (fetched by the guarded fetcher)."""
    image = row.get("image")
    if not image:
        return []
    return [image] if is_url(str(image)) else [str(Path(image_folder) / image)]


def question_seed(question_id: Any) -> int:
    """A per-question sampling seed, so a resumed sampled run writes what an uninterrupted one would."""
    return uuid.uuid5(uuid.NAMESPACE_URL, str(question_id)).int % 2**31


def problem_line(e: BaseException) -> str:
    """The one line a skipped question is reported with."""
    return (str(e).strip() or type(e).__name__).splitlines()[0]


def answer_id(model_id: str, question_id: Any, text: str) -> str:
    """Deterministic, so a resumed run writes the same file as an uninterrupted one."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{model_id}/{question_id}/{text}").hex


def answer_record(row: dict, model_id: str, text: str, finish_reason: str | None, prompt_tokens: int,
                  completion_tokens: int) -> dict:
    """One line of the answers file for the question `row` answered with `text`."""
    return {"question_id": row["question_id"], "prompt": row["text"], "text": text.strip(),
            "answer_id": answer_id(model_id, row["question_id"], text), "model_id": model_id,
            "metadata": {"finish_reason": finish_reason, "prompt_tokens": prompt_tokens,
                         "completion_tokens": completion_tokens}}


def answer_line(record: dict) -> str:
    """A record as its line of the answers file."""
    return json.dumps(record, ensure_ascii=False) + "\n"
