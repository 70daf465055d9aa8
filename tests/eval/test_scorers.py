"""Benchmark scorers against hand-computed expectations, on tiny annotation snippets in published formats."""
import json

import pytest

from llavakit.eval.answers import (
    extract_choice,
    mme_yes_no,
    normalize_gqa_answer,
    normalize_vqa_answer,
    pope_yes_no,
)
from llavakit.eval.scorers import format_table, pope_metrics, score, vqa_accuracy


@pytest.mark.parametrize("text, expected", [
    ("Two", "2"), ("ten dogs", "10 dogs"), ("none", "0"),            # number words
    ("The dog", "dog"), ("an apple", "apple"), ("A cat", "cat"),     # articles
    ("yes.", "yes"), ("Yes!", "yes"), ("3.5", "3.5"), ("red-white", "red white"),  # punctuation
    ("1,000", "1000"), ("1000", "1000"), ("dog, cat", "dog cat"),   # commas: in numbers and before a space
    ("dont", "don't"), ("Isnt it", "isn't it"), ("wont", "won't"), ("youre", "you're"),  # contractions
    (" Red\n", "red"), ("at 12:30.", "at 12:30"),
])
def test_normalize_vqa_answer(text, expected):
    assert normalize_vqa_answer(text) == expected


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(matches, expected):
    gts = ["2"] * matches + ["3"] * (10 - matches)
    assert vqa_accuracy("two.", gts) == pytest.approx(expected)


def test_vqa_accuracy_normalises_ground_truth_and_rejects_empty():
    assert vqa_accuracy("1000", ["1,000"] * 10) == 1.0
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("x", [])


@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a dog.", "yes"), ("No.", "no"), ("There is no cat. Yes.", "no"),
    ("It is not there", "no"), ("Yes. But no", "yes"), ("Nope", "yes"),  # LLaVA's rule looks at words only
])
def test_pope_yes_no(text, expected):
    assert pope_yes_no(text) == expected


@pytest.mark.parametrize("text, expected", [("Yes", "yes"), ("no.", "no"), ("Yes, it is.", "yes"),
                                            ("No, it isn't", "no"), ("The answer is no", "other")])
def test_mme_yes_no(text, expected):
    assert mme_yes_no(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("b", "B"), ("(C)", "C"), ("D.", "D"), ("The answer is B.", "B"), ("Answer: b", "B"),
    ("answer: (c)", "C"), ("The answer is B because the cat sits.", "B"), ("(B) cat", "B"), ("B. cat", "B"),
    ("C) a dog", "C"), ("I choose (D) here", "D"),
    ("the answer is a cat", None), ("A cat", None), ("(A) or (B)", None), ("A or B", None),
    ("The answer is A. No, the answer is B.", None), ("cat", None), ("Z", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_normalize_gqa_answer():
    assert normalize_gqa_answer("The Table.") == "table"
    assert normalize_gqa_answer("  left ") == "left"


def test_pope_metrics_tiny_table():
    preds = ["yes", "no", "yes", "no", "yes", "no"]
    labels = ["yes", "yes", "yes", "no", "no", "no"]  # TP 2, FN 1, TN 2, FP 1
    m = pope_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(400 / 6)
    assert m["precision"] == pytest.approx(200 / 3) and m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(200 / 3) and m["yes_ratio"] == 50.0 and m["n"] == 6


def _write_answers(path, texts: dict):
    rows = [{"question_id": q, "prompt": "p", "text": t, "answer_id": f"a{q}", "model_id": "m", "metadata": {}}
            for q, t in texts.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_vqav2_counts_missing_and_unknown(tmp_path):
    ann = {"annotations": [{"question_id": 1, "answers": [{"answer": "2"}] * 10},
                           {"question_id": 2, "answers": [{"answer": "dog"}] * 9 + [{"answer": "cat"}]},
                           {"question_id": 3, "answers": [{"answer": "red"}] * 10}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    answers = _write_answers(tmp_path / "a.jsonl", {1: "Two.", 2: "The cat", 99: "x"})
    r = score("vqav2", answers, tmp_path / "ann.json")
    assert r["task"] == "vqav2" and r["score"] == pytest.approx(65.0)  # (1.0 + 0.3) / 2
    assert (r["n"], r["missing"], r["unknown"]) == (2, 1, 1)


def test_score_textvqa_and_vizwiz_layouts(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"data": [{"question_id": 7, "answers": ["stop"] * 10}]}))
    assert score("textvqa", _write_answers(tmp_path / "a.jsonl", {7: "STOP"}), tmp_path / "t.json")["score"] == 100
    viz = [{"image": "VizWiz_val_0.jpg", "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10}]
    (tmp_path / "v.json").write_text(json.dumps(viz))
    answers = _write_answers(tmp_path / "b.jsonl", {"VizWiz_val_0.jpg": "Unanswerable."})
    assert score("vizwiz", answers, tmp_path / "v.json")["score"] == 100


def test_score_pope_per_category_file(tmp_path):
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    ann = _write_jsonl(tmp_path / "coco_pope_adversarial.json",
                       [{"question_id": i, "image": f"{i}.jpg", "text": "Is there a dog?", "label": label}
                        for i, label in enumerate(labels)])
    texts = ["Yes, there is a dog.", "No.", "Yes", "There is no dog in the image.", "Yes.", "No, there is not."]
    r = score("pope", _write_answers(tmp_path / "a.jsonl", dict(enumerate(texts))), ann)
    m = r["categories"]["adversarial"]
    assert m["f1"] == pytest.approx(200 / 3) and m["accuracy"] == pytest.approx(400 / 6)
    assert r["score"] == pytest.approx(200 / 3)


def test_score_mme_paired_questions(tmp_path):
    rows = [("existence", "1.jpg", "yes", "Yes"), ("existence", "1.jpg", "no", "No"),       # pair right
            ("existence", "2.jpg", "yes", "no"), ("existence", "2.jpg", "no", "No."),       # one wrong
            ("code_reasoning", "3.png", "yes", "Yes, it is."), ("code_reasoning", "3.png", "no", None)]
    ann = _write_jsonl(tmp_path / "mme.jsonl", [{"question_id": i, "category": c, "image": im, "label": label}
                                               for i, (c, im, label, _) in enumerate(rows)])
    answers = _write_answers(tmp_path / "a.jsonl", {i: t for i, (*_, t) in enumerate(rows) if t is not None})
    r = score("mme", answers, ann)
    ex = r["subtasks"]["existence"]
    assert (ex["accuracy"], ex["accuracy_plus"], ex["score"]) == (75.0, 50.0, 125.0)
    assert r["subtasks"]["code_reasoning"]["score"] == 50.0  # acc 1/2, acc+ 0, the unanswered one is wrong
    assert (r["perception"], r["cognition"], r["score"], r["missing"]) == (125.0, 50.0, 125.0, 1)


def test_score_mme_rejects_unknown_subtask(tmp_path):
    ann = _write_jsonl(tmp_path / "mme.jsonl", [{"question_id": 0, "category": "colour", "image": "x", "label": "yes"}])
    with pytest.raises(ValueError, match="colour"):
        score("mme", _write_answers(tmp_path / "a.jsonl", {0: "yes"}), ann)


def test_score_multiple_choice_layouts(tmp_path):
    (tmp_path / "mmb.tsv").write_text("index\tquestion\tA\tB\tanswer\tcategory\n"
                                      "0\tq\tx\ty\tB\tocr\n1\tq\tx\ty\tA\tocr\n2\tq\tx\ty\tA\tscene\n")
    r = score("mmbench", _write_answers(tmp_path / "a.jsonl", {0: "The answer is B.", 1: "B", 2: "A or B"}),
              tmp_path / "mmb.tsv")
    assert r["score"] == pytest.approx(100 / 3) and r["unparsed"] == 1
    assert r["categories"]["ocr"]["accuracy"] == 50.0
    (tmp_path / "problems.json").write_text(json.dumps({"5": {"choices": ["a", "b", "c"], "answer": 2}}))
    answers = _write_answers(tmp_path / "b.jsonl", {"5": "(C) c"})
    assert score("scienceqa", answers, tmp_path / "problems.json")["score"] == 100
    seed = {"questions": [{"question_id": "101_0", "answer": "D", "question_type_id": 1}]}
    (tmp_path / "seed.json").write_text(json.dumps(seed))
    answers = _write_answers(tmp_path / "c.jsonl", {"101_0": "Answer: d"})
    assert score("seed", answers, tmp_path / "seed.json")["score"] == 100


def test_score_gqa_and_format_table(tmp_path):
    (tmp_path / "gqa.json").write_text(json.dumps({"201": {"answer": "table"}, "202": {"answer": "left"}}))
    r = score("gqa", _write_answers(tmp_path / "a.jsonl", {"201": "The table.", "202": "Right"}), tmp_path / "gqa.json")
    assert r["score"] == 50.0
    table = format_table(r)
    assert "score" in table and "50.00" in table and "gqa" in table


def test_format_table_nested_rows_and_errors(tmp_path):
    text = format_table({"task": "pope", "score": 66.6667, "categories": {"random": {"f1": 66.6667, "n": 6}}})
    lines = text.splitlines()
    assert lines[1].split() == ["score", "66.67"]
    assert lines[-2].split() == ["categories", "f1", "n"] and lines[-1].split() == ["random", "66.67", "6"]
    with pytest.raises(ValueError, match="unknown task"):
        score("nocaps", tmp_path / "a", tmp_path / "b")
    (tmp_path / "g.json").write_text(json.dumps({"1": {"answer": "x"}}))
    with pytest.raises(ValueError, match="no answered question"):
        score("gqa", _write_answers(tmp_path / "a.jsonl", {"2": "x"}), tmp_path / "g.json")
