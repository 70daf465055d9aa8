"""Official scoring rules of LLaVA's benchmarks, over a `llavakit predict` answers file and the annotations.

`score(task, answers_path, annotation_path)` returns {"task", "score", ...details}; "score" is the
headline number in the unit LLaVA's papers report (percent, or MME's points). Rates in the details are
percent too; only `vqa_accuracy` returns a fraction. Questions are matched by str(question_id); a
question is scored when it is both answered and annotated, and the counts of annotated-but-unanswered
("missing") and answered-but-unannotated ("unknown") questions are reported. MME alone counts a missing
answer as wrong, because its score is a sum over fixed question pairs.

Annotation files accepted (the benchmarks' published layouts, or a plain JSONL):
  vqav2/textvqa/vizwiz: VQAv2 annotations JSON {"annotations": [{"question_id", "answers": [{"answer"}]}]},
      TextVQA JSON {"data": [{"question_id", "answers": [str]}]}, VizWiz JSON [{"image", "answers": [...]}]
      (keyed by "question_id" when present, else by "image"), or JSONL {"question_id", "answers"}.
  gqa: GQA questions JSON {qid: {"answer", ...}} (e.g. testdev_balanced_questions.json) or JSONL
      {"question_id", "answer"}.
  pope: POPE's coco_pope_<category>.json (JSONL {"question_id", "image", "text", "label"}; the category is
      the file name's last "_" part) or any JSONL with "question_id", "label" and a "category" per row.
  mme: JSONL {"question_id", "category", "image", "label"}: two yes/no questions per (category, image),
      categories named as MME names its subtasks (PERCEPTION, COGNITION below).
  mmbench/scienceqa/seed: MMBench TSV (columns index, answer, category), ScienceQA problems.json
      {pid: {"answer": int, "choices"}}, SEED-Bench JSON {"questions": [{"question_id", "answer",
      "question_type_id"}]}, or JSONL {"question_id", "answer": letter, optional "category"}.
"""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

from llavakit.datafiles import read_json_or_jsonl, read_jsonl, read_text
from llavakit.eval.answers import (
    extract_choice,
    mme_yes_no,
    normalize_gqa_answer,
    normalize_vqa_answer,
    pope_yes_no,
    read_answers,
)

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
LETTERS = "ABCDEFGH"


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """VQA accuracy in [0, 1]: over each ground truth left out in turn, min(1, matches among the rest / 3).

    Both sides are normalised with `normalize_vqa_answer`. With 10 answers: 1 match -> 0.3, 2 -> 0.6,
    3 -> 0.9, 4 or more -> 1.0.
    """
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer; got none")
    pred = normalize_vqa_answer(prediction)
    hits = [normalize_vqa_answer(gt) == pred for gt in gt_answers]
    total = sum(hits)
    return sum(min(1.0, (total - hit) / 3) for hit in hits) / len(hits)


# What each task's annotation file holds (the module docstring's list), for error messages.
LAYOUTS = {
    "vqa": "a VQAv2 annotations JSON {\"annotations\": [{\"question_id\", \"answers\": [{\"answer\"}]}]}, "
           "TextVQA JSON {\"data\": [{\"question_id\", \"answers\"}]}, VizWiz JSON [{\"image\", \"answers\"}] "
           "or JSONL {\"question_id\", \"answers\"}",
    "gqa": "GQA's questions JSON {question_id: {\"answer\", ...}} or JSONL {\"question_id\", \"answer\"}",
    "pope": "POPE's coco_pope_<category>.json: JSONL {\"question_id\", \"label\", optional \"category\"}",
    "mme": "MME JSONL {\"question_id\", \"category\", \"image\", \"label\"}",
    "choice": "MMBench TSV (columns index, answer, category), ScienceQA problems.json {pid: {\"answer\": int}}, "
              "SEED-Bench JSON {\"questions\": [{\"question_id\", \"answer\"}]} or JSONL "
              "{\"question_id\", \"answer\": letter}",
}


def _load_json(path: Path, layout: str):
    """A .jsonl file's rows or a JSON document, as Records (a missing key names the file and line)."""
    return read_json_or_jsonl(path, LAYOUTS[layout])


def _answer_strings(answers: list) -> list[str]:
    return [a["answer"] if isinstance(a, dict) else a for a in answers]


def load_vqa_annotations(path: str | Path) -> dict[str, list[str]]:
    """{question_id: ground-truth answers} from a VQAv2, TextVQA, VizWiz or JSONL annotation file."""
    data = _load_json(Path(path), "vqa")
    if isinstance(data, dict):
        if "annotations" not in data and "data" not in data:
            raise ValueError(f"{path}: expected a VQAv2 ('annotations') or TextVQA ('data') JSON; "
                             f"got keys {sorted(data)[:5]}")
        data = data.get("annotations", data.get("data"))
    return {str(row.get("question_id", row.get("image"))): _answer_strings(row["answers"]) for row in data}


def _matched(answers: dict[str, str], truth: dict) -> tuple[list[str], dict]:
    ids = [q for q in truth if q in answers]
    if not ids:
        raise ValueError(f"no answered question is in the annotations ({len(answers)} answers, {len(truth)} "
                         "annotated); check that the answers file and annotation file are for the same split")
    return ids, {"n": len(ids), "missing": len(truth) - len(ids), "unknown": len(set(answers) - set(truth))}


def score_vqa(answers: dict[str, str], truth: dict[str, list[str]]) -> dict:
    """Mean VQA accuracy (percent) of the answered, annotated questions."""
    ids, counts = _matched(answers, truth)
    acc = 100 * sum(vqa_accuracy(answers[q], truth[q]) for q in ids) / len(ids)
    return {"score": acc, "accuracy": acc, **counts}


def load_gqa_annotations(path: str | Path) -> dict[str, str]:
    """{question_id: answer} from GQA's questions JSON or a JSONL with "question_id" and "answer"."""
    data = _load_json(Path(path), "gqa")
    if isinstance(data, dict):
        return {str(q): row["answer"] for q, row in data.items()}
    return {str(row["question_id"]): row["answer"] for row in data}


def score_gqa(answers: dict[str, str], truth: dict[str, str]) -> dict:
    """Exact-match accuracy (percent) after `normalize_gqa_answer` on both sides."""
    ids, counts = _matched(answers, truth)
    right = sum(normalize_gqa_answer(answers[q]) == normalize_gqa_answer(truth[q]) for q in ids)
    return {"score": 100 * right / len(ids), "accuracy": 100 * right / len(ids), **counts}


def load_pope_annotations(path: str | Path) -> dict[str, tuple[str, str]]:
    """{question_id: (category, "yes" | "no")} from a POPE label file."""
    path = Path(path)
    default = path.stem.rsplit("_", 1)[-1]
    return {str(r["question_id"]): (r.get("category", default), r["label"].strip().lower())
            for r in read_jsonl(path, LAYOUTS["pope"])}


def pope_metrics(preds: list[str], labels: list[str]) -> dict:
    """Accuracy, precision, recall, F1 ("yes" is positive) and the share of "yes" answers, in percent."""
    tp = sum(p == "yes" and t == "yes" for p, t in zip(preds, labels, strict=True))
    fp = sum(p == "yes" and t == "no" for p, t in zip(preds, labels, strict=True))
    tn = sum(p == "no" and t == "no" for p, t in zip(preds, labels, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / sum(t == "yes" for t in labels) if "yes" in labels else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": 100 * (tp + tn) / len(labels), "precision": 100 * precision, "recall": 100 * recall,
            "f1": 100 * f1, "yes_ratio": 100 * preds.count("yes") / len(preds), "n": len(labels)}


def score_pope(answers: dict[str, str], truth: dict[str, tuple[str, str]]) -> dict:
    """POPE metrics per category; the headline is the mean F1 over categories (LLaVA's reported number)."""
    ids, counts = _matched(answers, truth)
    by_cat: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for q in ids:
        preds, labels = by_cat[truth[q][0]]
        preds.append(pope_yes_no(answers[q]))
        labels.append(truth[q][1])
    cats = {c: pope_metrics(p, t) for c, (p, t) in sorted(by_cat.items())}
    return {"score": sum(m["f1"] for m in cats.values()) / len(cats), "categories": cats, **counts}


def load_mme_annotations(path: str | Path) -> dict[str, tuple[str, str, str]]:
    """{question_id: (subtask, image, "yes" | "no")} from the MME JSONL; unknown subtasks are an error."""
    rows = read_jsonl(path, LAYOUTS["mme"])
    bad = {r["category"] for r in rows} - set(PERCEPTION) - set(COGNITION)
    if bad:
        raise ValueError(f"{path}: unknown MME subtasks {sorted(bad)}; expected names from "
                         f"{PERCEPTION + COGNITION}")
    return {str(r["question_id"]): (r["category"], r["image"], r["label"].strip().lower()) for r in rows}


def score_mme(answers: dict[str, str], truth: dict[str, tuple[str, str, str]]) -> dict:
    """MME: per subtask acc and acc+ (every question of an image right), score = 100 * (acc + acc+).

    Perception sums its 10 subtasks, cognition its 4; the headline is perception, as LLaVA reports it.
    An unanswered question counts as wrong.
    """
    right: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for q, (task, image, label) in truth.items():
        right[task][image].append(q in answers and mme_yes_no(answers[q]) == label)
    subtasks = {}
    for task in [t for t in PERCEPTION + COGNITION if t in right]:
        images = right[task].values()
        acc = sum(map(sum, images)) / sum(map(len, images))
        acc_plus = sum(all(r) for r in images) / len(images)
        subtasks[task] = {"accuracy": 100 * acc, "accuracy_plus": 100 * acc_plus, "score": 100 * (acc + acc_plus)}
    perception = sum(s["score"] for t, s in subtasks.items() if t in PERCEPTION)
    cognition = sum(s["score"] for t, s in subtasks.items() if t in COGNITION)
    return {"score": perception, "perception": perception, "cognition": cognition, "subtasks": subtasks,
            "n": sum(q in answers for q in truth), "missing": sum(q not in answers for q in truth),
            "unknown": len(set(answers) - set(truth))}


def load_choice_annotations(path: str | Path) -> dict[str, tuple[str, str]]:
    """{question_id: (letter, category)} from MMBench TSV, ScienceQA, SEED-Bench JSON or a JSONL."""
    path = Path(path)
    if path.suffix == ".tsv":
        text = read_text(path, LAYOUTS["choice"])
        rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t"))
        return {str(r["index"]): (r["answer"].strip().upper(), r.get("category") or "all") for r in rows}
    data = _load_json(path, "choice")
    if isinstance(data, dict) and "questions" in data:  # SEED-Bench
        return {str(r["question_id"]): (r["answer"], str(r.get("question_type_id", "all")))
                for r in data["questions"]}
    if isinstance(data, dict):  # ScienceQA problems.json: the answer is an index into "choices"
        return {str(q): (LETTERS[r["answer"]], r.get("subject", "all")) for q, r in data.items()}
    return {str(r["question_id"]): (r["answer"].strip().upper(), str(r.get("category", "all"))) for r in data}


def score_choice(answers: dict[str, str], truth: dict[str, tuple[str, str]]) -> dict:
    """Multiple-choice accuracy (percent) via `extract_choice`; an answer naming no single letter is wrong."""
    ids, counts = _matched(answers, truth)
    picks = {q: extract_choice(answers[q]) for q in ids}
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for q in ids:
        by_cat[truth[q][1]].append(picks[q] == truth[q][0])
    acc = 100 * sum(map(sum, by_cat.values())) / len(ids)
    cats = {c: {"accuracy": 100 * sum(r) / len(r), "n": len(r)} for c, r in sorted(by_cat.items())}
    unparsed = sum(p is None for p in picks.values())
    return {"score": acc, "accuracy": acc, "unparsed": unparsed, "categories": cats, **counts}


_LAYOUT_OF = {"vqav2": "vqa", "textvqa": "vqa", "vizwiz": "vqa", "mmbench": "choice", "scienceqa": "choice",
              "seed": "choice"}
TASKS = {
    "vqav2": (load_vqa_annotations, score_vqa), "textvqa": (load_vqa_annotations, score_vqa),
    "vizwiz": (load_vqa_annotations, score_vqa), "gqa": (load_gqa_annotations, score_gqa),
    "pope": (load_pope_annotations, score_pope), "mme": (load_mme_annotations, score_mme),
    "mmbench": (load_choice_annotations, score_choice), "scienceqa": (load_choice_annotations, score_choice),
    "seed": (load_choice_annotations, score_choice),
}


def score(task: str, answers_path: str | Path, annotation_path: str | Path) -> dict:
    """Score an answers file on `task` (one of TASKS): {"task", "score", ...task-specific details}."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    load, scorer = TASKS[task]
    answers = read_answers(answers_path)
    try:
        truth = load(annotation_path)
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # the file parsed but has another layout
        what = f"missing key {e.args[0]!r}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        layout = LAYOUTS[_LAYOUT_OF.get(task, task)]
        raise ValueError(f"{annotation_path} is not a {task} annotation file ({what}); expected {layout}") from None
    return {"task": task, **scorer(answers, truth)}


def _fmt(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def format_table(result: dict) -> str:
    """A plain-text table: the scalar results, then one row per category/subtask for nested results."""
    scalars = {k: v for k, v in result.items() if not isinstance(v, dict)}
    width = max(map(len, scalars))
    lines = [f"{k:<{width}}  {_fmt(v)}" for k, v in scalars.items()]
    for name, rows in ((k, v) for k, v in result.items() if isinstance(v, dict)):
        cols = list(dict.fromkeys(c for row in rows.values() for c in row))
        table = [[name, *cols]] + [[r, *(_fmt(rows[r].get(c, "")) for c in cols)] for r in rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
        lines += [""] + ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                         for line in table]
    return "\n".join(lines)
