"""Grade a model on held-out synthetic scenes: colour, shape, count and yes/no accuracy, grounding
(box IoU >= 0.5) and multi-turn follow-ups (answered with the model's own first answer in context)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from llavakit.demo.questions import QA, ask, follow_up
from llavakit.demo.scenes import NUMBER_WORDS, random_scene

TARGETS = {"color": 0.9, "shape": 0.9, "count": 0.9, "yesno": 0.9, "grounding": 0.7, "followup": 0.85}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_box(text: str) -> list[float] | None:
    """The first four numbers of an answer as a box, or None."""
    nums = [float(x) for x in _NUMBER.findall(text)]
    return nums[:4] if len(nums) >= 4 else None


def iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+", text.lower())


def correct(qa: QA, answer: str) -> bool:
    """Whether `answer` says what `qa.answer` says (boxes by IoU >= 0.5, words case-insensitively)."""
    if qa.box is not None:
        box = parse_box(answer)
        return box is not None and iou(box, qa.box) >= 0.5
    expected, got = _words(qa.answer), _words(answer)
    if qa.category == "count":
        numbers = {w.lower(): str(i) for i, w in enumerate(NUMBER_WORDS)}
        return [numbers.get(w, w) for w in got[:1]] == [numbers.get(w, w) for w in expected[:1]]
    return got == expected


@dataclass
class Report:
    """Per-category counts of correct answers, and a few wrong ones to look at."""

    right: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    mistakes: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, qa: QA, answer: str) -> None:
        ok = correct(qa, answer)
        self.total[qa.category] = self.total.get(qa.category, 0) + 1
        self.right[qa.category] = self.right.get(qa.category, 0) + ok
        if not ok and len(self.mistakes) < 12:
            self.mistakes.append((qa.question, qa.answer, answer))

    def accuracy(self, category: str) -> float:
        return self.right.get(category, 0) / max(self.total.get(category, 0), 1)

    def table(self) -> str:
        lines = [f"{'category':<10} {'n':>5} {'accuracy':>9} {'target':>7}  ok", "-" * 38]
        for cat, target in TARGETS.items():
            acc = self.accuracy(cat)
            verdict = "yes" if acc >= target else "NO"
            lines.append(f"{cat:<10} {self.total.get(cat, 0):>5} {acc:>9.1%} {target:>7.0%}  {verdict}")
        return "\n".join(lines)

    def passed(self) -> bool:
        return all(self.accuracy(c) >= t for c, t in TARGETS.items())


def evaluate(pipe, n: int = 500, seed: int = 10_000, max_new_tokens: int = 40, any_canvas: bool = False) -> Report:
    """Ask every graded kind about each of `n` held-out scenes (seeds the training set never uses); with
    `any_canvas` on canvases of any size (random_scene), not only the nine the grade uses."""
    rng = random.Random(seed)
    report = Report()
    for _ in tqdm(range(n), desc="eval", unit="scene", disable=None):
        scene = random_scene(rng, any_canvas=any_canvas)
        image = scene.render()
        for kind in ("color", "shape", "count", "exists", "where", "relation"):
            got = ask(rng, scene, kind)
            if got is None:
                continue
            qa, about = got
            answer = pipe.generate(qa.question, images=[image], max_new_tokens=max_new_tokens).text
            report.add(qa, answer)
            if kind in ("exists", "where") and about is not None:
                follow = follow_up(rng, scene, about)
                history = [{"role": "user", "content": qa.question}, {"role": "assistant", "content": answer},
                           {"role": "user", "content": follow.question}]
                report.add(follow, pipe.chat(history, images=[image], max_new_tokens=max_new_tokens).text)
    return report


def export_benchmark(out, n: int = 200, seed: int = 20_000) -> dict[str, int]:
    """Held-out scenes as a benchmark in the published formats, for `llavakit predict` + `eval score`:
    images/, questions.jsonl (model_vqa questions), vqa.jsonl (colour, shape and count questions with ten
    reference answers each, scored by VQA accuracy) and pope.jsonl (yes/no questions, scored by POPE's
    rules). Returns how many questions of each file were written."""
    import json
    from pathlib import Path

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    questions, vqa, pope = [], [], []
    for i in range(n):
        scene = random_scene(rng)
        name = f"scene_{i:04d}.png"
        scene.render().save(out / "images" / name)
        for kind in ("color", "shape", "count", "exists", "relation"):
            got = ask(rng, scene, kind)
            if got is None:
                continue
            qa, _ = got
            qid = len(questions)
            questions.append({"question_id": qid, "image": name, "text": qa.question, "category": qa.category})
            short = _words(qa.answer)[-1]  # "Red." -> "red", "A circle." -> "circle", "Two." -> "two"
            if qa.category == "yesno":
                pope.append({"question_id": qid, "image": name, "text": qa.question, "label": short,
                             "category": kind})
            else:
                vqa.append({"question_id": qid, "answers": [short] * 10})
    for file, rows in (("questions.jsonl", questions), ("vqa.jsonl", vqa), ("pope.jsonl", pope)):
        (out / file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"questions": len(questions), "vqa": len(vqa), "pope": len(pope)}
