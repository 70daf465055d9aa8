"""CLIP scoring of caption files: reading answers and question files, finding images, skips, and the score
itself under a hand-made judge whose right answers are known (an image is its mean colour, a caption the
colours it names)."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llavakit.eval.clip_score import (
    Caption,
    attach_images,
    clip_score,
    is_score_file,
    read_captions,
    read_image_map,
    read_scores,
    score_items,
    summarize,
)

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


class ColourJudge:
    """Embeds an image as its mean RGB and a text as the sum of the colours it names (zero when none)."""

    def __init__(self):
        self.images_embedded = 0

    def embed_images(self, images):
        self.images_embedded += len(images)
        rgb = torch.stack([torch.tensor(list(img.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0))),
                                        dtype=torch.float32) for img in images])
        return F.normalize(rgb, dim=-1)

    def embed_texts(self, texts):
        vecs = [sum((torch.tensor(COLOURS[w]) for w in t.lower().split() if w in COLOURS), torch.zeros(3))
                for t in texts]
        return F.normalize(torch.stack(vecs), dim=-1), [len(t.split()) > 5 for t in texts]


@pytest.fixture
def images(tmp_path):
    for name, colour in [("r.png", (255, 0, 0)), ("g.png", (0, 255, 0)), ("rg.png", (255, 255, 0))]:
        Image.new("RGB", (20, 12), colour).save(tmp_path / name)
    return tmp_path


def test_clip_score_is_100_times_the_cosine_clamped_at_zero():
    img = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.2]]), dim=-1)
    assert clip_score(img, txt).tolist() == pytest.approx([100.0, 100 / 2 ** 0.5, 0.0])


def test_the_matching_caption_scores_higher_than_a_wrong_one(images):
    captions = [Caption("1", "a red square", "r.png"), Caption("2", "a blue square", "r.png"),
                Caption("3", "a green square", "g.png"), Caption("4", "a red and green square", "rg.png"),
                Caption("5", "a red square", "rg.png")]
    items, skipped = attach_images(captions, None, images)
    judge = ColourJudge()
    rows, bad = score_items(judge, items, batch_size=2, progress=False)
    scores = {r["question_id"]: r["clip_score"] for r in rows}
    assert not skipped and not bad
    assert scores["1"] == pytest.approx(100) and scores["3"] == pytest.approx(100)
    assert scores["2"] == 0  # blue is orthogonal to a red image
    assert scores["4"] == pytest.approx(100)  # yellow = red + green
    assert scores["5"] == pytest.approx(100 / 2 ** 0.5)  # half right
    assert judge.images_embedded == 3  # r.png is embedded once for its two captions


def test_an_image_cache_is_shared_across_files(images):
    judge, cache = ColourJudge(), {}
    for text in ["red", "green"]:
        items, _ = attach_images([Caption("1", text, "r.png")], None, images)
        score_items(judge, items, progress=False, image_cache=cache)
    assert judge.images_embedded == 1


def test_answers_find_their_images_through_the_question_file(tmp_path, images):
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question_id": 1, "prompt": "Describe.", "text": "red", "answer_id": "x", "model_id": "m", "metadata": {}},
        {"question_id": 2, "prompt": "Describe.", "text": "green"},
        {"question_id": 3, "prompt": "Describe.", "text": "blue", "image": "g.png"},  # its own field wins
        {"question_id": 4, "prompt": "Describe.", "text": "red"},
        {"question_id": "5", "prompt": "Describe.", "text": "red"}]))
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question_id": 1, "image": "r.png", "text": "Describe."}, {"question_id": 2, "image": "missing.png"},
        {"question_id": 3, "image": "r.png"}, {"question_id": 5, "image": "g.png"}]))
    items, skipped = attach_images(read_captions(answers), read_image_map(questions), images)
    # ids keep their type from the answers file; "5" still finds question 5's image
    assert [(it.question_id, it.image) for it in items] == [(1, "r.png"), (3, "g.png"), ("5", "g.png")]
    assert len(skipped) == 2
    assert "missing.png not found" in skipped[0] and "question 4: no image" in skipped[1]


def test_without_a_question_file_the_skip_says_to_pass_one(images):
    _, skipped = attach_images([Caption("7", "red")], None, images)
    assert skipped == ["question 7: no image (the row has no 'image' field; pass --questions)"]


def test_mindie_image_info_json_is_read_as_image_to_caption(tmp_path):
    path = tmp_path / "gpu_coco_predict.json"
    path.write_text(json.dumps({"000000000139.jpg": "A living room.", "000000000285.jpg": "A bear."}))
    assert read_captions(path) == [Caption("000000000139.jpg", "A living room.", "000000000139.jpg"),
                                   Caption("000000000285.jpg", "A bear.", "000000000285.jpg")]


@pytest.mark.parametrize("content, message", [
    ('{"question_id": 1}\n', "row 1 needs 'question_id' and a 'text' string"),
    ('{"question_id": 1, "text": "a"\n', r"a.jsonl:1 is not valid JSON \(.*\); expected llavakit predict's answers"),
])
def test_bad_answers_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "a.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_captions(path)


def test_an_unreadable_image_is_skipped_and_counted(images):
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    items, _ = attach_images([Caption("1", "red", "r.png"), Caption("2", "red", "broken.png")], None, images)
    rows, bad = score_items(ColourJudge(), items, progress=False)
    assert [r["question_id"] for r in rows] == ["1"]
    assert len(bad) == 1 and "question 2" in bad[0] and "could not be decoded" in bad[0]


def test_summary_and_score_file_round_trip(tmp_path):
    rows = [{"question_id": "1", "image": "a.png", "text": "x", "clip_score": 30.0, "truncated": False},
            {"question_id": "2", "image": "b.png", "text": "y", "clip_score": 20.0, "truncated": True},
            {"question_id": "3", "image": "c.png", "text": "z", "clip_score": 28.0, "truncated": False}]
    summary = summarize(rows, skipped=2)
    assert summary == {"clip_score": 26.0, "n": 3, "skipped": 2, "truncated": 1, "min": 20.0, "median": 28.0,
                       "max": 30.0}
    path = tmp_path / "scores.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert is_score_file(path) and read_scores(path)["2"]["clip_score"] == 20.0
    answers = tmp_path / "a.jsonl"
    answers.write_text('{"question_id": 1, "text": "x"}\n')
    assert not is_score_file(answers)
