"""The built-in demo model: its data generator, its recipe (cut down), and the shipped checkpoint."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import llavakit
from llavakit.demo.evaluate import correct, iou, parse_box
from llavakit.demo.questions import KINDS, PHRASES, QA, ask, conversation
from llavakit.demo.scenes import CANVASES, COLORS, SHAPES, draw_shape, random_scene
from llavakit.processing.image import expand2square
from llavakit.weights.hub import DEMO_MODEL


def test_scenes_are_deterministic_and_cover_every_colour_and_shape():
    a = [random_scene(random.Random(s)) for s in range(300)]
    b = [random_scene(random.Random(s)) for s in range(300)]
    assert a == b
    assert {s.color for sc in a for s in sc.shapes} == set(COLORS)
    assert {s.kind for sc in a for s in sc.shapes} == set(SHAPES)
    assert len({(sc.width, sc.height) for sc in a}) >= 5  # mixed aspect ratios
    assert any(sc.background[0] != sc.background[1] for sc in a)  # gradients as well as plain backgrounds
    for sc in a:
        for shape in sc.shapes:
            box = sc.norm_box(shape)
            assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1


def test_any_canvas_scenes_come_in_every_size_and_the_standard_ones_do_not_change():
    fixed = [random_scene(random.Random(s)) for s in range(200)]
    assert {(sc.width, sc.height) for sc in fixed} == set(CANVASES)  # the grade's nine canvases, as before
    spans = [(s.box[2] - s.box[0]) / min(sc.width, sc.height) for sc in fixed for s in sc.shapes
             if s.kind != "rectangle"]
    assert 0.2 <= min(spans) < 0.26 and 0.42 < max(spans) <= 0.44  # shapes at 24-44% of the short side
    free = [random_scene(random.Random(s), any_canvas=True) for s in range(200)]
    sizes = {(sc.width, sc.height) for sc in free}
    assert len(sizes) > 150
    for sc in free:
        assert min(sc.width, sc.height) >= 64 and max(sc.width, sc.height) <= 320
        assert max(sc.width, sc.height) / min(sc.width, sc.height) <= 1.81
        for shape in sc.shapes:
            x1, y1, x2, y2 = shape.box
            assert 0 <= x1 < x2 <= sc.width and 0 <= y1 < y2 <= sc.height
    spans = [(s.box[2] - s.box[0]) / min(sc.width, sc.height) for sc in free for s in sc.shapes
             if s.kind != "rectangle"]
    assert min(spans) < 0.23 and max(spans) > 0.5  # 20-60%: bigger and smaller than the grade's shapes


def test_questions_use_many_phrasings():
    rng = random.Random(0)
    asked = [qa.question for s in range(400) for qa in conversation(rng, random_scene(rng), 4)]
    for kind in ("color", "count", "where", "exists"):
        used = {p for p in PHRASES[kind] if any(q.startswith(p.split("{")[0]) for q in asked)}
        assert len(used) >= 4, kind


def test_hard_negatives_name_absent_shapes_that_share_a_colour_or_kind_and_leave_the_grade_alone():
    def asked(**kw):
        rng = random.Random(3)
        return [(sc, qa) for sc in (random_scene(rng) for _ in range(300))
                for qa in conversation(rng, sc, 6, **kw)]

    # The grade's questions (hard_negatives=0) are the ones drawn before the option existed.
    digest = hashlib.sha256(json.dumps([(qa.question, qa.answer) for _, qa in asked()]).encode()).hexdigest()
    assert digest[:16] == "3d67a2c0da305645"

    def negatives(got):
        out = []
        for sc, qa in got:
            names = [f"{c} {k}" for c in COLORS for k in SHAPES if f" {c} {k}" in qa.question]
            if qa.category == "yesno" and qa.answer == "No." and len(names) == 1:  # existence, not relations
                name = names[0]
                assert name not in {s.name for s in sc.shapes}
                c, k = name.split()
                out.append(any(c == s.color or k == s.kind for s in sc.shapes))
        return out

    plain, hard = negatives(asked()), negatives(asked(hard_negatives=1.0))
    assert len(plain) > 50 and len(hard) > 50
    assert all(hard) and sum(plain) / len(plain) < 0.7  # plain draws are mostly far from the scene


def test_kind_only_names_a_kind_of_the_scene_in_a_colour_it_lacks():
    def sorts(**kw):
        rng = random.Random(4)
        out = {"yes": 0, "kind only": 0, "other": 0}
        for _ in range(400):
            scene = random_scene(rng)
            qa, _ = ask(rng, scene, "exists", **kw)
            c, k = next((c, k) for c in COLORS for k in SHAPES if f" {c} {k}" in qa.question)
            present = (c, k) in {(s.color, s.kind) for s in scene.shapes}
            assert (qa.answer == "Yes.") == present
            kind_only = not present and k in {s.kind for s in scene.shapes}
            out["yes" if present else "kind only" if kind_only else "other"] += 1
        return out

    # Half are about present shapes; 60% of the rest name a kind of the scene in another colour, and the
    # remaining 40% are drawn as without the option (half present, half sharing the colour or the kind).
    hard, kind_only = sorts(hard_negatives=1.0), sorts(hard_negatives=1.0, kind_only=0.6)
    assert 0.55 < kind_only["yes"] / 400 < 0.66 and 0.45 < hard["yes"] / 400 < 0.55
    assert kind_only["kind only"] / (400 - kind_only["yes"]) > 0.8 > hard["kind only"] / (400 - hard["yes"])


def test_every_kind_and_option_draws_what_it_always_drew():
    """ask() over every kind, up to four shapes, both canvas sets and the existence options: the questions,
    answers, boxes and shapes asked about, and so the RNG's use, pinned (training data is drawn from them)."""
    rng = random.Random(7)
    got = []
    for i in range(200):
        scene = random_scene(rng, 1 + i % 4, any_canvas=bool(i % 2))
        for kind in KINDS:
            for hard_negatives, kind_only in ((0.0, 0.0), (0.5, 0.0), (1.0, 0.6)):
                asked = ask(rng, scene, kind, hard_negatives, kind_only)
                got.append(asked and (asked[0].question, asked[0].answer, asked[0].category, asked[0].box,
                                      asked[1] and asked[1].name))
    assert {g[2] for g in got if g} == {"caption", "color", "shape", "count", "yesno", "grounding"}
    assert any(g is None for g in got)  # scenes that cannot support a kind (one shape: no relation)
    digest = hashlib.sha256(json.dumps(got).encode()).hexdigest()
    assert digest[:16] == "0dfb96c35fdcd78c"


def test_an_unknown_question_kind_is_refused_with_the_known_ones():
    scene = random_scene(random.Random(0))
    with pytest.raises(ValueError, match="'follow_color'.*'caption', 'color', 'shape', 'count', 'exists'"):
        ask(random.Random(0), scene, "follow_color")


def test_box_is_in_the_padded_square_frame():
    rng = random.Random(5)
    scene = next(s for s in (random_scene(rng) for _ in range(50)) if s.width != s.height)
    square = expand2square(scene.render(), (0, 0, 0))
    for shape in scene.shapes:
        x1, y1, x2, y2 = (v * square.width for v in scene.norm_box(shape))
        center = square.getpixel((int((x1 + x2) / 2), int((y1 + y2) / 2)))
        if shape.kind != "star":  # a star's centre is filled too, but keep the check to solid shapes
            assert center == COLORS[shape.color]


def test_grading():
    assert parse_box("It is at [0.10, 0.20, 0.50, 0.60].") == [0.1, 0.2, 0.5, 0.6]
    assert iou([0, 0, 1, 1], [0, 0, 0.5, 1]) == pytest.approx(0.5)
    box = QA("q", "[0.10, 0.20, 0.50, 0.60]", "grounding", box=[0.1, 0.2, 0.5, 0.6])
    assert correct(box, "[0.12, 0.2, 0.5, 0.6]") and not correct(box, "[0.6, 0.6, 0.9, 0.9]")
    assert correct(QA("q", "Two.", "count"), "2") and correct(QA("q", "Red.", "color"), "red")
    assert not correct(QA("q", "Red.", "color"), "Blue.")


def test_cut_down_recipe_runs(tmp_path, monkeypatch):
    from llavakit.demo import recipe

    model, report = recipe.train_demo(tmp_path, scale=0.004, eval_scenes=2)
    assert report is not None and sum(report.total.values()) > 0
    pipe = llavakit.load(model, dtype="float32", device="cpu")
    assert pipe.template.name == "mistral_instruct" and pipe.config.image.mode == "pad"
    assert (tmp_path / "stage2" / "loss_curve.png").is_file()


def test_a_stopped_recipe_goes_on_with_resume_and_keeps_what_it_finished(tmp_path, monkeypatch):
    from llavakit.demo import recipe
    from llavakit.train import checkpoint as ckpt
    from llavakit.train import recipe as trainer

    monkeypatch.setattr(recipe, "STAGES", recipe.STAGES[:3])
    monkeypatch.setattr(recipe, "VISION_STEPS", 300)
    monkeypatch.setattr(recipe, "SAVE_STEPS", 2)
    scale = 0.006  # stages of 2, 2 and 4 steps; a checkpoint every 2 steps
    real_save, real_restore, killed = trainer.save, ckpt.restore_training_state, []

    def save_then_kill(run, directory):  # the process dies right after stage3's first checkpoint
        real_save(run, directory)
        if run.output_dir.name == "stage3" and directory.name.startswith("checkpoint-") and not killed:
            killed.append(directory.name)
            raise RuntimeError("killed")

    monkeypatch.setattr(trainer, "save", save_then_kill)
    with pytest.raises(RuntimeError, match="killed"):
        recipe.train_demo(tmp_path, scale=scale, eval_scenes=0)
    assert killed == ["checkpoint-2"] and not (tmp_path / "stage3" / "final").exists()
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "init" / "model.safetensors",
                                              tmp_path / "stage2" / "final" / "model.safetensors")}

    with pytest.raises(ValueError, match="--resume"):  # never overwrites a run without being told
        recipe.train_demo(tmp_path, scale=scale, eval_scenes=0)
    with pytest.raises(ValueError, match="scale 0.006"):  # goes on only with the settings it started with
        recipe.train_demo(tmp_path, scale=0.01, eval_scenes=0, resume=True)

    trained, restored = [], []
    real_train = recipe.train
    monkeypatch.setattr(recipe, "train", lambda cfg: trained.append(Path(cfg.output_dir).name) or real_train(cfg))
    monkeypatch.setattr(ckpt, "restore_training_state",
                        lambda path, *a: restored.append(path.name) or real_restore(path, *a))
    model, _ = recipe.train_demo(tmp_path, scale=scale, eval_scenes=0, resume=True)
    assert trained == ["stage3"] and restored == ["checkpoint-2"]  # stages 1-2 kept, stage 3 from its step 2
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert model == tmp_path / "stage3" / "final" and (model / ckpt.STATE_FILE).is_file()
    assert not list((tmp_path / "stage3").glob("checkpoint-*"))  # final/ holds the stage now
    assert llavakit.load(model, dtype="float32", device="cpu").generate("Count the shapes.", max_new_tokens=2)


def test_the_recipe_refuses_a_workdir_that_holds_something_else(tmp_path, capsys):
    from llavakit.cli import main
    from llavakit.demo import recipe

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        recipe.train_demo(tmp_path, scale=0.004, eval_scenes=0)
    assert main(["demo", "train", "--workdir", str(tmp_path), "--scale", "0.004", "-n", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llavakit: error: ") and "not empty" in err and "\n" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


shipped = pytest.mark.skipif(not (DEMO_MODEL / "config.json").is_file(), reason="demo model not built")


@pytest.fixture(scope="module")
def demo():
    return llavakit.load("demo", dtype="float32", device="cpu")


def _drawing(width, height, shapes, background=(236, 236, 236)):
    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)
    for kind, color, box in shapes:
        draw_shape(draw, kind, box, COLORS[color])
    return img


@shipped
def test_demo_answers_the_readme_example(demo):
    """The answers the README shows for its first command, on the README's picture (drawn outside the
    generator: 480x320, near-white background)."""
    example = Image.open(Path(__file__).parents[2] / "examples" / "images" / "shapes.png")
    assert demo.generate("What color is the circle?", images=[example]).text.strip() == "Red."
    assert demo.generate("How many shapes are there?", images=[example]).text.strip() == "Two."


@shipped
def test_demo_answers_about_pictures_drawn_by_hand(demo):
    one = _drawing(150, 110, [("circle", "red", (40, 25, 100, 85))])
    assert demo.generate("What color is the circle?", images=[one]).text.strip() == "Red."
    assert demo.generate("How many shapes are there?", images=[one]).text.strip() == "One."
    two = _drawing(140, 140, [("square", "blue", (10, 20, 60, 70)), ("triangle", "yellow", (80, 70, 130, 120))])
    assert demo.generate("How many shapes are there?", images=[two]).text.strip() == "Two."
    assert demo.generate("Is there a blue square?", images=[two]).text.strip() == "Yes."
    assert demo.generate("Is there a green star?", images=[two]).text.strip() == "No."
    assert demo.generate("What color is the triangle?", images=[two]).text.strip() == "Yellow."
    box = parse_box(demo.generate("Where is the yellow triangle?", images=[two]).text)
    assert box is not None and iou(box, [80 / 140, 70 / 140, 130 / 140, 120 / 140]) >= 0.5


@shipped
def test_transformers_loads_the_demo_and_gives_the_same_answers(demo):
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    rng = random.Random(123)
    for _ in range(3):
        image = random_scene(rng).render()
        for question in ("Describe the image.", "How many shapes are there?"):
            ids = demo.tokenize(question, images=[image])
            pixels = demo.processor.prepare_images([image])[0].pixel_values
            with torch.no_grad():
                ref = hf.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=30,
                                  do_sample=False)[0, len(ids):].tolist()
            ours = demo.generate(question, images=[image], max_new_tokens=30).token_ids
            assert ours == ref[:len(ours)] and (len(ours) == len(ref) or ours[-1] == demo.tokenizer.eos_token_id)


def test_vision_stage_targets_follow_the_drawing():
    from llavakit.demo.scenes import Scene, Shape
    from llavakit.demo.vision import scene_targets

    # 160x120 canvas padded to 160x160 (20 px bands above and below): a red square on patches (1..2, 1..2)
    # of the 8x8 grid (20 px each), i.e. pixels 20..60 of the square frame.
    scene = Scene(160, 120, ((235, 225, 200),) * 2, (Shape("square", "red", (20, 0, 60, 40)),))
    t = scene_targets(scene, 8)
    owner = t["owner"].view(8, 8)
    assert owner[1:3, 1:3].eq(1).all() and owner.sum() == 4
    assert t["color"].view(8, 8)[1, 1] == 1 + list(COLORS).index("red")
    assert t["kind"].view(8, 8)[2, 2] == 1 + SHAPES.index("square") and t["kind"].view(8, 8)[0, 0] == 0
    # box [0.12, 0.12, 0.38, 0.38] in the padded square -> digits (1, 2) (1, 2) (3, 8) (3, 8)
    assert scene.norm_box(scene.shapes[0]) == [0.12, 0.12, 0.38, 0.38]
    assert t["tens"][9].tolist() == [1, 1, 3, 3] and t["units"][9].tolist() == [2, 2, 8, 8]
    assert (t["tens"][0] == -100).all()  # no box where there is no shape
    assert t["count"] == 1 and t["count_kind"].tolist() == [0, 1, 0, 0, 0]
    assert t["present"].sum() == 1 and t["mask"][9].all()
    assert t["aspect"][9] == 1 and t["aspect"][0] == -100  # a square is even; no aspect off shapes


def test_factor_code_writes_out_each_patch_facts():
    """The code a patch's feature regresses onto is the weighted sum of its facts' vectors: the same on
    every patch of a shape, different between shapes that differ in one fact, the scene part everywhere."""
    from llavakit.demo.scenes import Scene, Shape
    from llavakit.demo.vision import FactorCode, scene_targets

    shapes = (Shape("rectangle", "red", (10, 10, 70, 40)), Shape("circle", "red", (80, 60, 110, 90)))
    t = {k: v[None] for k, v in scene_targets(Scene(120, 120, ((235, 225, 200),) * 2, shapes), 8).items()}
    code = FactorCode(32)
    c = code(t)[0]  # (64, 32)
    owner = t["owner"][0]
    rect, circ, bg = (owner == 1).nonzero()[:, 0], (owner == 2).nonzero()[:, 0], (owner == 0).nonzero()[:, 0]
    assert len(rect) >= 2 and len(circ) >= 2
    assert torch.allclose(c[rect[0]], c[rect[1]]) and torch.allclose(c[bg[0]], c[bg[-1]])
    w = FactorCode.WEIGHTS
    kinds = w["kind"] * (code.kind[1 + SHAPES.index("rectangle")] - code.kind[1 + SHAPES.index("circle")])
    digits = sum(w[n] * (code_table[j][t[n][0, rect[0], j]] - code_table[j][t[n][0, circ[0], j]])
                 for n, code_table in (("tens", code.tens), ("units", code.units)) for j in range(4))
    assert torch.allclose(c[rect[0]] - c[circ[0]], kinds + digits, atol=1e-5)  # same colour: it cancels
    scene = c[bg[0]] - w["color"] * code.color[0] - w["kind"] * code.kind[0]
    per_kind = sum(code.count_kind[k][t["count_kind"][0, k]] for k in range(len(SHAPES)))
    assert torch.allclose(scene, w["scene"] * (code.count[2] + code.present[t["present"][0] > 0].sum(0) + per_kind),
                          atol=1e-5)


def test_vision_stage_learns(tmp_path):
    """A few steps of the dense vision stage lower its loss on a fixed batch (it trains the tower itself)."""
    from llavakit.demo.build import build_tokenizer, demo_config
    from llavakit.demo.vision import SceneBatches, SceneProbe, probe_losses
    from llavakit.models.llava import LlavaForConditionalGeneration

    cfg = demo_config(build_tokenizer())
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    tower = model.vision_tower
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    probe = SceneProbe(tower, model.projector, cfg.text.hidden_size)
    pixels, targets = next(iter(SceneBatches(cfg.image, cfg.vision.grid_size, 8, seed=0)))
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = sum(probe_losses(probe(pixels), targets, probe.code).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8
    assert any(not torch.equal(before[k], v) for k, v in tower.state_dict().items())


def test_exported_benchmark_scores_with_the_eval_commands(tmp_path):
    """Exported questions + annotations work with `eval score`: the true answers score 100, wrong ones less."""
    import json

    from llavakit.demo.evaluate import export_benchmark
    from llavakit.eval.scorers import score

    counts = export_benchmark(tmp_path, n=12)
    questions = [json.loads(line) for line in (tmp_path / "questions.jsonl").read_text().splitlines()]
    assert counts["questions"] == len(questions) and counts["vqa"] > 0 and counts["pope"] > 0
    assert all((tmp_path / "images" / q["image"]).is_file() for q in questions)
    rows = {name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
            for name in ("vqa", "pope")}
    vqa = {r["question_id"]: r["answers"][0] for r in rows["vqa"]}
    pope = {r["question_id"]: r["label"] for r in rows["pope"]}
    truth = {q: a.capitalize() + "." for q, a in {**vqa, **pope}.items()}
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": q, "text": t}) + "\n" for q, t in truth.items()))
    assert score("vqav2", answers, tmp_path / "vqa.jsonl")["score"] == pytest.approx(100)
    assert score("pope", answers, tmp_path / "pope.jsonl")["score"] == pytest.approx(100)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({"question_id": q, "text": "Purple." if q in vqa else "No."}) + "\n"
                             for q in truth))
    assert score("vqav2", wrong, tmp_path / "vqa.jsonl")["score"] < 100
