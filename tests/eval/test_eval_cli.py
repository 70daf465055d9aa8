"""`llavakit eval score` and `llavakit ground` as a user runs them."""

from __future__ import annotations

import json

from checkpoints import build_hf_model, processor_config, write_hf_checkpoint
from conftest import noise_image
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


def test_eval_score_unknown_task_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("")
    assert main(["eval", "score", "--task", "nope", "--answers", str(tmp_path / "a.jsonl"),
                 "--annotations", str(tmp_path / "a.jsonl")]) == 1
    assert capsys.readouterr().err.startswith("llavakit: error:")


def test_ground_writes_a_png(tmp_path):
    d = write_hf_checkpoint(build_hf_model("llava", seed=2), tmp_path / "ck", "hub",
                            processor=processor_config("LlavaImageProcessor", do_pad=True))
    image = tmp_path / "in.png"
    noise_image(64, 40).save(image)
    out = tmp_path / "out.png"
    assert main(["ground", "--model", str(d), "--image", str(image), "--query", "Where is the cat?",
                 "--out", str(out), "--max-new-tokens", "8"]) == 0
    assert Image.open(out).size == (64, 40)
