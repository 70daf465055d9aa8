"""`llavakit eval summarize`: relative scores of review files against numbers worked out by hand."""

from __future__ import annotations

import json

import pytest

from llavakit.cli import main
from llavakit.eval.summarize import review_name

# (question_id, category, [reference, model]) — the expectations below are computed by hand from these rows.
ROWS = [
    (0, "conv", [8, 9]), (1, "conv", [7, 6]),                          # conv: means 7.5 / 7.5 -> 100.0
    (2, "detail", [9, 4.5]), (3, "detail", [-1, -1]),                  # detail: 4.0 / 1.75 -> 43.75 -> 43.8
    (4, "complex", [1, 1]), (5, "complex", [1, 1]), (6, "complex", [2, 3]),
    # complex: means 4/3 -> 1.333 and 5/3 -> 1.667; 100 * 1.667 / 1.333 = 125.06 -> 125.1 (the original divides
    # the rounded means: the exact 5/4 would give 125.0)
]


def write_reviews(path, rows=ROWS, key="tuple"):
    path.write_text("".join(json.dumps({"id": i + 1, "question_id": qid, "category": category, "content": "x",
                                        key: pair}) + "\n" for i, (qid, category, pair) in enumerate(rows)))
    return path


def summarize(capsys, *argv):
    assert main(["eval", "summarize", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_categories_all_and_rounding(tmp_path, capsys):
    path = write_reviews(tmp_path / "review.jsonl")
    result = summarize(capsys, path)[str(path)]
    assert list(result) == ["all", "complex", "conv", "detail"]  # sorted, as the original prints them
    assert result["conv"] == {"count": 2, "reference": 7.5, "model": 7.5, "relative": 100.0, "unscored": 0}
    assert result["detail"] == {"count": 2, "reference": 4.0, "model": 1.75, "relative": 43.8, "unscored": 1}
    assert result["complex"] == {"count": 3, "reference": 1.333, "model": 1.667, "relative": 125.1, "unscored": 0}
    # all: reference (8+7+9-1+1+1+2)/7 = 27/7 = 3.857; model (9+6+4.5-1+1+1+3)/7 = 23.5/7 = 3.357;
    # 100 * 3.357 / 3.857 = 87.04 -> 87.0
    assert result["all"] == {"count": 7, "reference": 3.857, "model": 3.357, "relative": 87.0, "unscored": 1}


def test_ignore_list(tmp_path, capsys):
    path = write_reviews(tmp_path / "review.jsonl")
    result = summarize(capsys, path, "--ignore", "3,6", "--ignore", "0")[str(path)]
    assert result["detail"] == {"count": 1, "reference": 9.0, "model": 4.5, "relative": 50.0, "unscored": 0}
    assert result["conv"] == {"count": 1, "reference": 7.0, "model": 6.0, "relative": 85.7, "unscored": 0}
    # complex: [1, 1] twice -> 100.0; all: reference (7+9+1+1)/4 = 4.5, model (6+4.5+1+1)/4 = 3.125 -> 69.4
    assert result["complex"]["relative"] == 100.0
    assert result["all"] == {"count": 4, "reference": 4.5, "model": 3.125, "relative": 69.4, "unscored": 0}


def test_string_question_ids_and_the_original_score_field(tmp_path, capsys):
    """LLaVA's older reviews have 'score' and no category: only "all"; ids compare as text."""
    rows = [("a1", None, [6, 3]), ("a2", None, [4, 3])]
    path = tmp_path / "review_old.jsonl"
    path.write_text("".join(json.dumps({"question_id": qid, "score": pair}) + "\n" for qid, _, pair in rows))
    assert summarize(capsys, path, "--ignore", "a2")[str(path)] == {
        "all": {"count": 1, "reference": 6.0, "model": 3.0, "relative": 50.0, "unscored": 0}}


def test_table_output_for_several_files(tmp_path, capsys):
    first = write_reviews(tmp_path / "gpt4_text_llava-13b.jsonl")
    second = write_reviews(tmp_path / "other.jsonl", [(0, "conv", [0, 0])])
    assert main(["eval", "summarize", str(first), str(second)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "llava-13b",
        "category  count  reference  model  relative  unscored",
        "all       7      3.857      3.357  87.0      1",
        "complex   3      1.333      1.667  125.1     0",
        "conv      2      7.5        7.5    100.0     0",
        "detail    2      4.0        1.75   43.8      1",
        "",
        "other",
        "category  count  reference  model  relative  unscored",
        "all       1      0.0        0.0    -         0",   # a zero reference mean has no relative score
        "conv      1      0.0        0.0    -         0",
    ]
    assert review_name("dir/gpt4_text_x.jsonl") == "x"


@pytest.mark.parametrize("line, message", [
    ({"question_id": 1, "tuple": [8]}, "review.jsonl:1: the score pair is [8]; expected two numbers"),
    ({"question_id": 1}, "review.jsonl:1 has no 'score' key"),
    ({"tuple": [8, 9]}, "review.jsonl:1 has no 'question_id' key"),
])
def test_bad_review_rows_are_one_line_errors(tmp_path, capsys, line, message):
    path = tmp_path / "review.jsonl"
    path.write_text(json.dumps(line) + "\n")
    assert main(["eval", "summarize", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_everything_ignored_is_an_error(tmp_path, capsys):
    path = write_reviews(tmp_path / "review.jsonl", ROWS[:1])
    assert main(["eval", "summarize", str(path), "--ignore", "0"]) == 1
    assert f"{path} has no review left after --ignore" in capsys.readouterr().err
