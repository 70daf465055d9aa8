"""Questions about a scene, each kind in several phrasings, with the answer and what grading needs."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from llavakit.demo.scenes import COLORS, NUMBER_WORDS, SHAPES, Scene, Shape

PHRASES = {
    "caption": ["Describe the image.", "What is in this picture?", "What do you see?", "Describe this picture briefly.",
                "What does the image show?", "Give a short caption for this image.", "what's in the image?"],
    "color": ["What color is the {kind}?", "What is the color of the {kind}?", "Which color is the {kind}?",
              "Tell me the color of the {kind}.", "what colour is the {kind}", "The {kind} is what color?"],
    "shape": ["What shape is the {color} object?", "What is the {color} shape?", "Which shape is {color}?",
              "What kind of shape is the {color} one?", "name the {color} shape", "The {color} object is what shape?"],
    "count": ["How many shapes are there?", "How many objects are in the image?", "Count the shapes.",
              "How many shapes do you see?", "how many things are in the picture", "What is the number of shapes?"],
    "count_kind": ["How many {kind}s are there?", "How many {kind}s do you see?", "Count the {kind}s.",
                   "What is the number of {kind}s?", "how many {kind}s are in the image"],
    "exists": ["Is there a {name}?", "Do you see a {name}?", "Is there a {name} in the image?",
               "Does the picture contain a {name}?", "is there any {name}", "Can you find a {name}?"],
    "where": ["Where is the {name}?", "Give the bounding box of the {name}.", "Locate the {name}.",
              "Where is the {name} in the image?", "find the {name}", "What are the coordinates of the {name}?"],
    "left": ["Is the {a} to the left of the {b}?", "Is the {a} left of the {b}?", "Is the {a} on the left of the {b}?"],
    "right": ["Is the {a} to the right of the {b}?", "Is the {a} right of the {b}?",
              "Is the {a} on the right side of the {b}?"],
    "above": ["Is the {a} above the {b}?", "Is the {a} higher than the {b}?", "Is the {a} over the {b}?"],
    "follow_color": ["What color is it?", "And its color?", "Which color is it?", "what colour is it"],
    "follow_where": ["Where is it?", "And where is it?", "Give its bounding box.", "Locate it."],
    "follow_shape": ["What shape is it?", "And its shape?", "What kind of shape is it?"],
}


@dataclass(slots=True)
class QA:
    question: str
    answer: str
    category: str  # color | shape | count | yesno | grounding | caption | followup
    box: list[float] | None = None  # for grounding: the true box
    extra: dict = field(default_factory=dict)


def box_text(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def caption(scene: Scene) -> str:
    shapes = sorted(scene.shapes, key=lambda s: s.center[0])
    if len(shapes) == 1:
        return f"A {shapes[0].name}."
    names = [f"a {s.name}" for s in shapes]
    return f"{NUMBER_WORDS[len(shapes)]} shapes: {', '.join(names[:-1])} and {names[-1]}."


def _unique(scene: Scene, attr: str) -> list[Shape]:
    values = [getattr(s, attr) for s in scene.shapes]
    return [s for s in scene.shapes if values.count(getattr(s, attr)) == 1]


def _phrase(rng: random.Random, phrasing: str, **kw) -> str:
    return rng.choice(PHRASES[phrasing]).format(**kw)


def _yes(flag: bool) -> str:
    return "Yes." if flag else "No."


Asked = tuple[QA, Shape | None] | None  # the question and the shape it is about; None: the scene cannot support it


def _ask_caption(rng: random.Random, scene: Scene, hard_negatives: float, kind_only: float) -> Asked:
    return QA(_phrase(rng, "caption"), caption(scene), "caption"), None


def _ask_color(rng: random.Random, scene: Scene, hard_negatives: float, kind_only: float) -> Asked:
    pool = _unique(scene, "kind")  # "the circle" names one shape only when the scene has one circle
    if not pool:
        return None
    s = rng.choice(pool)
    return QA(_phrase(rng, "color", kind=s.kind), f"{s.color.capitalize()}.", "color"), s


def _ask_shape(rng: random.Random, scene: Scene, hard_negatives: float, kind_only: float) -> Asked:
    pool = _unique(scene, "color")
    if not pool:
        return None
    s = rng.choice(pool)
    return QA(_phrase(rng, "shape", color=s.color), f"A {s.kind}.", "shape"), s


def _ask_count(rng: random.Random, scene: Scene, hard_negatives: float, kind_only: float) -> Asked:
    if rng.random() < 0.5:
        return QA(_phrase(rng, "count"), f"{NUMBER_WORDS[len(scene.shapes)]}.", "count"), None
    k = rng.choice(SHAPES)
    n = sum(s.kind == k for s in scene.shapes)
    return QA(_phrase(rng, "count_kind", kind=k), f"{NUMBER_WORDS[n]}.", "count"), None


def _exists_present(rng: random.Random, shapes) -> tuple[QA, Shape]:
    s = rng.choice(shapes)
    return QA(_phrase(rng, "exists", name=s.name), "Yes.", "yesno"), s


def _exists_kind_only(rng: random.Random, shapes, kind_only: float) -> Asked:
    """Half about a present shape; of the rest, `kind_only` name a kind in the scene in a colour it lacks there.
    None: neither was drawn (no such name, or the draw said no), and the question is drawn as without it."""
    if rng.random() < 0.5:
        return _exists_present(rng, shapes)
    present, kinds = {s.name for s in shapes}, {s.kind for s in shapes}
    if rng.random() < kind_only:
        pool = [(c, k) for c in COLORS for k in SHAPES if f"{c} {k}" not in present and k in kinds]
        if pool:
            return QA(_phrase(rng, "exists", name=" ".join(rng.choice(pool))), "No.", "yesno"), None
    return None


def _ask_exists(rng: random.Random, scene: Scene, hard_negatives: float, kind_only: float) -> Asked:
    shapes = scene.shapes
    if kind_only and (got := _exists_kind_only(rng, shapes, kind_only)) is not None:
        return got
    if rng.random() < 0.5:
        return _exists_present(rng, shapes)
    present = {s.name for s in shapes}
    absent = [(c, k) for c in COLORS for k in SHAPES if f"{c} {k}" not in present]
    if hard_negatives and rng.random() < hard_negatives:
        absent = [(c, k) for c, k in absent if any(c == s.color or k == s.kind for s in shapes)] or absent
    return QA(_phrase(rng, "exists", name=" ".join(rng.choice(absent))), "No.", "yesno"), None


def _ask_where(rng: random.Random, scene: Scene, hard_negatives: float, kind_only: float) -> Asked:
    s = rng.choice(scene.shapes)
    box = scene.norm_box(s)
    return QA(_phrase(rng, "where", name=s.name), box_text(box), "grounding", box=box), s


def _ask_relation(rng: random.Random, scene: Scene, hard_negatives: float, kind_only: float) -> Asked:
    if len(scene.shapes) < 2:
        return None
    a, b = rng.sample(list(scene.shapes), 2)
    rel = rng.choice(["left", "right", "above"])
    (ax, ay), (bx, by) = a.center, b.center
    truth = {"left": ax < bx, "right": ax > bx, "above": ay < by}[rel]
    return QA(_phrase(rng, rel, a=a.name, b=b.name), _yes(truth), "yesno"), None


# One function per question kind, all with the same arguments (only existence questions use the last two).
# The order is KINDS', the order that recipe weights are written in.
ASKERS: dict[str, Callable[[random.Random, Scene, float, float], Asked]] = {
    "caption": _ask_caption, "color": _ask_color, "shape": _ask_shape, "count": _ask_count,
    "exists": _ask_exists, "where": _ask_where, "relation": _ask_relation,
}
KINDS = list(ASKERS)
WEIGHTS = [1, 2, 2, 2, 2, 3, 2]


def ask(rng: random.Random, scene: Scene, kind: str, hard_negatives: float = 0.0, kind_only: float = 0.0) -> Asked:
    """One question of `kind` about the scene (None when the scene cannot support it), and the shape it
    is about (for follow-ups). `hard_negatives`: how often an existence question about an absent shape
    names one that shares its colour or its kind with a shape in the scene ("Is there a red square?" next
    to a red circle); at 0 (the grade's questions) the name is drawn from all absent ones and the RNG is
    used exactly as before. `kind_only` (training only): half the existence questions are about a shape in
    the scene; of the rest, this share name a kind in the scene in a colour it does not have there ("Is
    there a green circle?" next to a red circle) when there is one, and the others are drawn as without it."""
    asker = ASKERS.get(kind)
    if asker is None:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")
    return asker(rng, scene, hard_negatives, kind_only)


def follow_up(rng: random.Random, scene: Scene, about: Shape) -> QA:
    """A question that only makes sense with the previous turn in context ("What color is it?")."""
    kind = rng.choice(["follow_color", "follow_where", "follow_shape"])
    if kind == "follow_color":
        return QA(_phrase(rng, kind), f"{about.color.capitalize()}.", "followup")
    if kind == "follow_shape":
        return QA(_phrase(rng, kind), f"A {about.kind}.", "followup")
    box = scene.norm_box(about)
    return QA(_phrase(rng, kind), box_text(box), "followup", box=box)


def conversation(rng: random.Random, scene: Scene, turns: int, kinds: list[str] = KINDS,
                 weights: list[int] = WEIGHTS, hard_negatives: float = 0.0, kind_only: float = 0.0) -> list[QA]:
    """Up to `turns` questions; a question about one shape may be followed by a follow-up about it."""
    out: list[QA] = []
    tries = 0
    while len(out) < turns and tries < 20:
        tries += 1
        got = ask(rng, scene, rng.choices(kinds, weights)[0], hard_negatives, kind_only)
        if got is None:
            continue
        qa, about = got
        out.append(qa)
        if about is not None and len(out) < turns and "where" in kinds and rng.random() < 0.35:
            out.append(follow_up(rng, scene, about))
    return out
