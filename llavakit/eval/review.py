"""Judge-scored evaluation: LLaVA-Bench (COCO, In-the-Wild) and LLaVAR's GPT-4 review, with any
OpenAI-compatible chat endpoint as the judge.

Each question becomes the request the original LLaVA sends (`llava/eval/eval_gpt_review_visual.py` and
`eval_gpt_review_bench.py`): its system message, then the image's context (captions, and "category: bbox" lines
when the context row has instances), the question, the reference answer as Assistant 1 and the model's answer as
Assistant 2 in their labelled blocks, and the category's rule from the original rules JSON. The judge's first
line holds the score pair; the review file keeps the original's fields and is appended to, so a rerun asks only
for what is missing.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llavakit import datafiles
from llavakit.eval.answers import ANSWERS_FORMAT

SYSTEM_MESSAGE = "You are a helpful and precise assistant for checking the quality of the answer."
UNSCORED = [-1, -1]  # what the original records for a reply without a score pair
QUESTIONS_FORMAT = "a question file: one {\"question_id\", \"image\", \"text\", \"category\"} object per line"
CONTEXTS_FORMAT = ("a context file: one {\"image\", \"captions\" or \"caption\", optional \"instances\": "
                   "[{\"category\", \"bbox\"}]} object per line")
RULES_FORMAT = "a rules file: a JSON object {category: {\"role\", \"prompt\"}} (LLaVA's llava/eval/table/rule.json)"
REVIEWS_FORMAT = "a review file written by `llavakit eval review`: one {\"question_id\", \"tuple\", ...} per line"
RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
MAX_DELAY = 60.0  # seconds: the longest wait between two tries, whatever Retry-After asks
_SCORE_SEPARATORS = re.compile(r"[\s,]+")


@dataclass(slots=True)
class ReviewItem:
    """One question's judge request (`content`, the user message) and the review row it fills."""

    content: str
    row: dict[str, Any]


def context_text(context: dict) -> str:
    """The [Context] block's body: the captions (a list joined by lines, or one text), then a blank line and
    one "category: bbox" line per instance when the row has instances (the COCO form with boxes)."""
    captions = context["captions"] if "captions" in context else context["caption"]
    text = "\n".join(captions) if isinstance(captions, list) else str(captions)
    if "instances" in context:
        boxes = "\n".join(f"{box['category']}: {box['bbox']}" for box in context["instances"])
        text = f"{text}\n\n{boxes}"
    return text


def review_content(context: str, question: str, answer1: str, answer2: str, role: str, prompt: str) -> str:
    """The judge's user message, laid out as the original's."""
    return (f"[Context]\n{context}\n\n"
            f"[Question]\n{question}\n\n"
            f"[{role} 1]\n{answer1}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer2}\n\n[End of {role} 2]\n\n"
            f"[System]\n{prompt}\n\n")


def parse_score(reply: str) -> list[float]:
    """The [reference, model] score pair on the reply's first line: two numbers separated by spaces and/or a
    comma ("8 9", "8,9", "8, 9"), else [-1, -1] as the original records it. The original splits on single
    spaces, so it also gave [-1, -1] for "8, 9" or a trailing space; those are read here."""
    parts = [p for p in _SCORE_SEPARATORS.split(reply.split("\n", 1)[0]) if p]
    if len(parts) != 2:
        return list(UNSCORED)
    try:
        scores = [float(p) for p in parts]
    except ValueError:
        return list(UNSCORED)
    return scores if all(map(math.isfinite, scores)) else list(UNSCORED)


def _by_question_id(rows: list, what: str) -> dict[str, Any]:
    """Rows keyed by str(question_id); a repeated id keeps its last row, as `llavakit predict` files may."""
    out = {}
    for row in rows:
        if "question_id" not in row or "text" not in row:
            raise datafiles.DataFileError(f"{row.where} has keys {sorted(row)}; expected 'question_id' and 'text' "
                                          f"({what})")
        out[str(row["question_id"])] = row
    return out


@dataclass(slots=True)
class ReviewInputs:
    """The files a review reads, loaded and keyed: contexts by image, answers by str(question_id), rules by
    category; `paths` names each file for the error messages."""

    questions: list[datafiles.Record]
    contexts: dict[str, Any]
    references: dict[str, Any]
    answers: dict[str, Any]
    rules: dict[str, Any]
    paths: dict[str, Path]

    @classmethod
    def read(cls, questions: Path, contexts: Path, reference: Path, answers: Path, rules: Path) -> ReviewInputs:
        question_rows = datafiles.read_jsonl(questions, QUESTIONS_FORMAT)
        if not question_rows:
            raise datafiles.DataFileError(f"{questions} has no question; expected {QUESTIONS_FORMAT}")
        rule_table = datafiles.read_json(rules, RULES_FORMAT)
        if not isinstance(rule_table, dict):
            raise datafiles.DataFileError(f"{rules} holds a JSON {datafiles.json_kind(rule_table)}; expected "
                                          f"{RULES_FORMAT}")
        return cls(question_rows, {row["image"]: row for row in datafiles.read_jsonl(contexts, CONTEXTS_FORMAT)},
                   _by_question_id(datafiles.read_jsonl(reference, ANSWERS_FORMAT), ANSWERS_FORMAT),
                   _by_question_id(datafiles.read_jsonl(answers, ANSWERS_FORMAT), ANSWERS_FORMAT), rule_table,
                   {"contexts": contexts, "reference": reference, "answers": answers, "rules": rules})

    def item(self, index: int, question: datafiles.Record, category_prefix: str) -> ReviewItem:
        """Question `index`'s request, or an error naming what it lacks (an answer, a context, a rule)."""
        qid = str(question["question_id"])
        for name, table in (("reference", self.references), ("answers", self.answers)):
            if qid not in table:
                raise datafiles.DataFileError(f"{self.paths[name]} has no answer for question_id "
                                              f"{question['question_id']!r} ({question.where}); answer every "
                                              "question before the review")
        if question["image"] not in self.contexts:
            raise datafiles.DataFileError(f"{self.paths['contexts']} has no context for image {question['image']!r} "
                                          f"({question.where}); expected {CONTEXTS_FORMAT}")
        category = category_prefix + str(question["category"])
        rule = self.rules.get(category)
        if not isinstance(rule, dict):
            hint = "" if category_prefix else (" (LLaVA-Bench In-the-Wild's rules are 'llava_bench_' + category: "
                                               "give that category prefix)")
            raise datafiles.DataFileError(f"{self.paths['rules']} has no rule for category {category!r} "
                                          f"({question.where}); it has {', '.join(map(repr, self.rules))}{hint}")
        reference, answer = self.references[qid], self.answers[qid]
        content = review_content(context_text(self.contexts[question["image"]]), question["text"],
                                 reference["text"], answer["text"], rule["role"], rule["prompt"])
        row = {"id": index + 1, "question_id": question["question_id"],
               "answer1_id": reference.get("answer_id", reference["question_id"]),
               "answer2_id": answer.get("answer_id", answer["question_id"]), "category": category}
        return ReviewItem(content, row)


def build_items(questions: Path, contexts: Path, reference: Path, answers: Path, rules: Path,
                category_prefix: str = "") -> list[ReviewItem]:
    """Every question's request, in question order, all checked before the judge is asked.
    `category_prefix` goes before each question's category to find its rule and to label its review
    ("llava_bench_" for LLaVA-Bench In-the-Wild, as `eval_gpt_review_bench.py` does)."""
    inputs = ReviewInputs.read(questions, contexts, reference, answers, rules)
    seen = set()
    for question in inputs.questions:
        qid = str(question["question_id"])
        if qid in seen:
            raise datafiles.DataFileError(f"{question.where}: question_id {question['question_id']!r} appears twice "
                                          "in the question file; question ids must be unique")
        seen.add(qid)
    return [inputs.item(index, question, category_prefix) for index, question in enumerate(inputs.questions)]


class JudgeError(RuntimeError):
    """The judge could not be asked (refused, unreachable, or not an OpenAI chat endpoint); one line."""


class _Retryable(Exception):
    """A try that may work later (rate limit, server error, timeout, dropped connection)."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass(slots=True)
class JudgeClient:
    """An OpenAI-compatible chat endpoint asked one review at a time (thread-safe: no shared connection).

    `url`: a base URL such as https://api.openai.com/v1 or http://host:8000/v1 (/chat/completions is added
    unless given). 429, 408, 409 and 5xx replies, timeouts and dropped connections are retried `retries`
    times, waiting `backoff` seconds and doubling (Retry-After when the server says more), at most 60 s.
    `timeout` bounds each read of the reply. The standard library's HTTP client is enough for one POST, so
    no HTTP package is required."""

    url: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    retries: int = 5
    backoff: float = 1.0
    temperature: float = 0.0
    max_tokens: int = 1024
    endpoint: str = field(init=False)

    def __post_init__(self):
        base = self.url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"

    def ask(self, content: str, stop: threading.Event | None = None) -> str:
        """The judge's reply to one review request; setting `stop` ends the waits between tries early."""
        stop = stop or threading.Event()
        body = json.dumps({"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                           "messages": [{"role": "system", "content": SYSTEM_MESSAGE},
                                        {"role": "user", "content": content}]}).encode()
        for attempt in range(self.retries + 1):
            try:
                return self._post(body)
            except _Retryable as e:
                last = e
                delay = min(MAX_DELAY, max(self.backoff * 2**attempt, e.retry_after or 0.0))
                if attempt < self.retries and stop.wait(delay):
                    raise JudgeError("stopped: another request failed") from None
        raise JudgeError(f"the judge at {self.endpoint} failed {self.retries + 1} times (last: {last}); rerun "
                         "later: the reviews already written are kept and not asked again")

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            raise self._http_error(e) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise _Retryable(f"no reply: {reason or type(e).__name__}") from None
        return self._reply_text(payload)

    def _http_error(self, e: urllib.error.HTTPError) -> Exception:
        message = _server_message(e)
        if e.code in RETRY_STATUS:
            return _Retryable(f"HTTP {e.code}{message}", _retry_after(e.headers.get("Retry-After")))
        hint = (": check the API key (--api-key-env names the variable that holds it)" if e.code in (401, 403)
                else ": check --judge-url and --judge-model")
        return JudgeError(f"the judge at {self.endpoint} answered HTTP {e.code}{message}{hint}")

    def _reply_text(self, payload: bytes) -> str:
        try:
            message = json.loads(payload)["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"the judge at {self.endpoint} did not answer with an OpenAI chat completion "
                             f"(it sent {payload[:80]!r}); check --judge-url") from None
        content = message.get("content") if isinstance(message, dict) else None
        return content if isinstance(content, str) else ""


def _server_message(e: urllib.error.HTTPError) -> str:
    """': <the server's error message>' from an OpenAI-style error body, or '' (one line, shortened)."""
    try:
        data = json.loads(e.read() or b"null")
    except (ValueError, OSError):
        return ""
    error = data.get("error", data.get("detail")) if isinstance(data, dict) else None
    text = error.get("message") if isinstance(error, dict) else error
    return f": {str(text).splitlines()[0][:200]}" if text else ""


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: the exponential backoff is used instead


@dataclass(slots=True)
class ReviewCounts:
    """What one run did: reviews asked now, found already done, and replies without a score pair."""

    asked: int = 0
    done_before: int = 0
    unscored: int = 0


def reviewed_ids(out: Path) -> set[str]:
    """The question ids already in a review file (none when it does not exist yet)."""
    if not Path(out).exists():
        return set()
    return {str(row["question_id"]) for row in datafiles.read_jsonl(out, REVIEWS_FORMAT)}


def run_reviews(items: list[ReviewItem], client: JudgeClient, out: Path, concurrency: int = 4,
                on_review: Callable[[dict], None] | None = None) -> ReviewCounts:
    """Ask the judge about every item not yet in `out`, `concurrency` at a time, appending each review as it
    arrives (an interrupted run loses nothing written). The first JudgeError stops the run: nothing more is
    asked, the replies in flight are still written. When every item is reviewed the file is rewritten in
    question order."""
    done = reviewed_ids(out)
    todo = [item for item in items if str(item.row["question_id"]) not in done]
    counts = ReviewCounts(done_before=len(items) - len(todo))
    failures, stop = [], threading.Event()

    def ask(content: str) -> str | None:
        if stop.is_set():
            return None
        try:
            return client.ask(content, stop)
        except JudgeError as e:
            failures.append(e)  # before stop is set: the first failure is the cause, not a "stopped"
            stop.set()
            return None

    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        futures = {pool.submit(ask, item.content): item for item in todo}
        with open(out, "a", encoding="utf-8") as f:
            for future in as_completed(futures):
                reply = future.result()
                if reply is None:
                    continue
                review = {**futures[future].row, "content": reply, "tuple": parse_score(reply)}
                f.write(json.dumps(review, ensure_ascii=False) + "\n")
                f.flush()
                counts.asked += 1
                counts.unscored += review["tuple"] == UNSCORED
                if on_review:
                    on_review(review)
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
    if failures:
        raise failures[0]
    _rewrite_in_order(out, [str(item.row["question_id"]) for item in items])
    return counts


def _rewrite_in_order(out: Path, order: list[str]) -> None:
    """The review file sorted by question order (reviews of other questions kept at the end), replaced whole."""
    position = {qid: i for i, qid in enumerate(order)}
    lines = [line for line in Path(out).read_text(encoding="utf-8").splitlines() if line.strip()]
    lines.sort(key=lambda line: position.get(str(json.loads(line)["question_id"]), len(order)))
    tmp = Path(f"{out}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, out)
