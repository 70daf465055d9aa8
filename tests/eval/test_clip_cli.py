"""`llavakit eval clip-score` and `llavakit eval compare` as a user runs them, on the tiny open_clip checkpoint
whose embeddings open_clip itself computed (assets/open_clip/golden.safetensors)."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from llavakit.cli import main

ASSETS = Path(__file__).parent / "assets" / "open_clip"
GOLDEN = load_file(ASSETS / "golden.safetensors")
META = json.loads((ASSETS / "golden.json").read_text(encoding="utf-8"))
CAPTIONS, IMAGES = META["captions"], META["images"]
MODEL = ["--clip-model", str(ASSETS / "standard"), "--images", str(ASSETS)]


def expected(image: int, caption: int) -> float:
    """open_clip's CLIP score for a golden image and caption."""
    cos = float(GOLDEN["standard.image_emb"][image] @ GOLDEN["standard.text_emb"][caption])
    return 100 * max(cos, 0.0)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def questions(tmp_path):
    rows = [{"question_id": q, "image": IMAGES[q % 3], "text": "Describe the image."} for q in range(4)]
    return _write_jsonl(tmp_path / "q.jsonl", rows + [{"question_id": 4, "image": "gone.png", "text": "?"}])


def _answers(path: Path, captions: list[int]) -> Path:
    """Answers as `llavakit predict` writes them (no image field); question q gets CAPTIONS[captions[q]]."""
    return _write_jsonl(path, [{"question_id": q, "prompt": "Describe the image.", "text": CAPTIONS[c],
                                "answer_id": f"a{q}", "model_id": "tiny", "metadata": {}}
                               for q, c in enumerate(captions)])


def test_clip_score_matches_open_clip_and_counts_skips(tmp_path, questions, capsys):
    answers = _answers(tmp_path / "a.jsonl", [0, 1, 2, 5, 1, 3])  # q4's image is missing, q5 has none
    out = tmp_path / "per_item.jsonl"
    assert main(["eval", "clip-score", "--answers", str(answers), "--questions", str(questions), *MODEL,
                 "--output", str(out), "--json", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    want = [expected(0, 0), expected(1, 1), expected(2, 2), expected(0, 5)]
    assert [r["clip_score"] for r in result["items"]] == pytest.approx(want, abs=1e-3)
    assert (result["n"], result["skipped"], result["truncated"]) == (4, 2, 2)
    assert result["clip_score"] == pytest.approx(sum(want) / 4, abs=1e-3)
    assert [json.loads(line) for line in out.read_text().splitlines()] == result["items"]
    assert "gone.png not found" in captured.err and "question 5: no image" in captured.err


def test_compare_answers_files_and_score_files_agree(tmp_path, questions, capsys):
    a, b = _answers(tmp_path / "a.jsonl", [0, 0, 0, 0]), _answers(tmp_path / "b.jsonl", [4, 4, 4, 4])
    plot, pairs = tmp_path / "diff.png", tmp_path / "pairs.jsonl"
    assert main(["eval", "compare", str(a), str(b), "--questions", str(questions), *MODEL, "--json",
                 "--plot", str(plot), "--output", str(pairs), "--resamples", "500"]) == 0
    direct = json.loads(capsys.readouterr().out)
    want_a = [expected(q % 3, 0) for q in range(4)]
    want_b = [expected(q % 3, 4) for q in range(4)]
    assert direct["mean_a"] == pytest.approx(sum(want_a) / 4, abs=1e-3)
    assert direct["mean_b"] == pytest.approx(sum(want_b) / 4, abs=1e-3)
    assert direct["verdict"] == "B better"  # the empty caption is closer to these images in this random model
    assert [json.loads(line)["difference"] for line in pairs.read_text().splitlines()] == pytest.approx(
        [wb - wa for wa, wb in zip(want_a, want_b, strict=True)], abs=1e-3)
    assert Image.open(plot).format == "PNG"
    for name, src in (("a", a), ("b", b)):
        assert main(["eval", "clip-score", "--answers", str(src), "--questions", str(questions), *MODEL,
                     "--output", str(tmp_path / f"{name}.scores.jsonl")]) == 0
    capsys.readouterr()
    assert main(["eval", "compare", str(tmp_path / "a.scores.jsonl"), str(tmp_path / "b.scores.jsonl"), "--json",
                 "--resamples", "500"]) == 0
    from_files = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in from_files.items() if k not in ("a", "b")} == pytest.approx(
        {k: v for k, v in direct.items() if k not in ("a", "b")}, abs=1e-9)


def test_compare_prints_a_verdict_in_words(tmp_path, capsys):
    def rows(shift):
        return [{"question_id": q, "image": f"{q}.jpg", "clip_score": 30.0 + q % 3 + shift} for q in range(10)]

    a, b = _write_jsonl(tmp_path / "a.jsonl", rows(0.0)), _write_jsonl(tmp_path / "b.jsonl", rows(-0.5))
    assert main(["eval", "compare", str(a), str(b)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"verdict: A better ({a})")


def test_compare_answers_without_a_judge_is_a_one_line_error(tmp_path, capsys):
    a = _answers(tmp_path / "a.jsonl", [0, 1])
    assert main(["eval", "compare", str(a), str(a)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llavakit: error:") and "--clip-model" in err and err.count("\n") == 1


def test_clip_score_with_no_image_found_is_a_one_line_error(tmp_path, questions, capsys):
    answers = _answers(tmp_path / "a.jsonl", [0, 1])
    assert main(["eval", "clip-score", "--answers", str(answers), "--questions", str(questions),
                 "--clip-model", str(ASSETS / "standard"), "--images", str(tmp_path)]) == 1
    assert "llavakit: error: nothing to score" in capsys.readouterr().err


def test_clip_score_with_an_unreadable_checkpoint_is_a_one_line_error(tmp_path, questions, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ASSETS / "standard", ckpt)
    (ckpt / "open_clip_model.safetensors").write_bytes(b"\0" * 64)
    answers = _answers(tmp_path / "a.jsonl", [0])
    assert main(["eval", "clip-score", "--answers", str(answers), "--questions", str(questions),
                 "--clip-model", str(ckpt), "--images", str(ASSETS)]) == 1
    err = capsys.readouterr().err
    assert "llavakit: error: could not read CLIP weights" in err and err.count("\n") == 2  # + the loading line
