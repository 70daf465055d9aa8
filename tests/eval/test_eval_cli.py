"""`llavakit eval score` and `llavakit ground` as a user runs them."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from llavakit.cli import main


def test_eval_score_prints_json_with_a_headline_score(tmp_path, capsys):
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "prompt": "q", "text": t}) + "\n"
                               for i, t in enumerate(["Two", "a cat.", "red"])))
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotations": [{"question_id": 0, "answers": [{"answer": "2"}] * 10},
                                               {"question_id": 1, "answers": [{"answer": "cat"}] * 10},
                                               {"question_id": 2, "answers": [{"answer": "blue"}] * 10}]}))
    assert main(["eval", "score", "--task", "vqav2", "--answers", str(answers), "--annotations", str(ann), "--json",
                 "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["score"] == json.loads((tmp_path / "r.json").read_text())["score"] == 200 / 3


def test_eval_score_unknown_task_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("")
    with pytest.raises(SystemExit) as e:
        main(["eval", "score", "--task", "nope", "--answers", str(tmp_path / "a.jsonl"),
              "--annotations", str(tmp_path / "a.jsonl")])
    assert e.value.code == 2 and "argument --task: invalid choice: 'nope'" in capsys.readouterr().err


def test_ground_writes_a_png(tmp_path):
    import random

    from llavakit.demo.scenes import random_scene

    scene = random_scene(random.Random(3))  # the built-in demo model answers "where" questions with a box
    image = tmp_path / "in.png"
    scene.render().save(image)
    shape = scene.shapes[0]
    out = tmp_path / "out.png"
    assert main(["ground", "--image", str(image), "--query", f"Where is the {shape.color} {shape.kind}?",
                 "--out", str(out), "--max-new-tokens", "24"]) == 0
    assert Image.open(out).size == (scene.width, scene.height)
