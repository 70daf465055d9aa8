"""The question-file pieces both `llavakit predict` runs share, and the Ray flags' checks (no Ray started)."""

from __future__ import annotations

import json

import pytest

from llavakit.cli import main
from llavakit.scale.questions import answer_record, answered_ids, image_sources, read_questions


def test_images_are_paths_under_the_folder_or_urls_as_they_are(tmp_path):
    assert image_sources({"image": "a/b.png"}, tmp_path) == [str(tmp_path / "a" / "b.png")]
    assert image_sources({"image": "https://example.com/x.jpg"}, tmp_path) == ["https://example.com/x.jpg"]
    assert image_sources({"text": "no image"}, tmp_path) == []


def test_bad_lines_are_reported_with_their_line_and_the_rest_read(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 1, "text": "a"}\n\n{oops\n{"question_id": 2}\n{"question_id": "x", "text": "b"}\n')
    rows, problems = read_questions(q)
    assert [r["question_id"] for r in rows] == [1, "x"]
    assert problems[0].startswith(f"{q}:3: not valid JSON") and problems[1].startswith(f"{q}:4: a question needs")


def test_a_cut_off_last_answer_is_dropped_and_its_question_asked_again(tmp_path):
    a = tmp_path / "a.jsonl"
    line = json.dumps(answer_record({"question_id": 7, "text": "q"}, "m", " Red. ", "stop", 5, 2))
    a.write_text(line + "\n" + line[:15])
    assert answered_ids(a) == {7}
    assert a.read_text() == line + "\n" and json.loads(line)["text"] == "Red."


@pytest.mark.parametrize("flags, message", [
    (["--num-replicas", "2"], "--num-replicas needs --ray"),
    (["--batch-size", "4", "--ray-address", "auto"], "--ray-address, --batch-size need --ray"),
    (["--ray", "--tensor-parallel-size", "2", "--gpus-per-replica", "1"], "needs at least that many"),
])
def test_ray_flags_are_checked_before_anything_runs(tmp_path, capsys, flags, message):
    argv = ["predict", "--model", "demo", "--questions", str(tmp_path / "none.jsonl"), "--answers",
            str(tmp_path / "a.jsonl"), *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
