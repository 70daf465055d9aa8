"""`llavakit demo`: train, evaluate or look at the built-in demo model (synthetic shapes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "the built-in demo model: train it (about 290 minutes on 2 CPU cores) or evaluate it"
EXAMPLE = """examples:
  llavakit demo eval                           # grade the shipped demo model on 500 held-out scenes
  llavakit demo train --workdir /tmp/demo      # the whole recipe: vision stage, language stages, evaluation
  llavakit demo train --workdir /tmp/demo --install   # ... and make the result the built-in model
  llavakit demo train --workdir /tmp/demo --resume    # go on with a run that was stopped
  llavakit demo scene --seed 3 --out scene.png # draw one synthetic scene
  llavakit demo export --out demo-bench -n 200 # held-out scenes as a benchmark for predict + eval score
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["train", "eval", "scene", "export"])
    p.add_argument("--workdir", type=Path, default=Path("demo-work"), help="train: where data and checkpoints go")
    p.add_argument("--scale", type=float, default=1.0, help="train: fraction of the full step count")
    p.add_argument("--install", action="store_true", help="train: copy the result into the package")
    p.add_argument("--resume", action="store_true", help="train: go on with the run in --workdir (finished stages "
                   "are kept; an interrupted one goes on from its last checkpoint, saved every 300 steps)")
    p.add_argument("--model", default="demo", help="eval: the checkpoint to grade (default: the built-in one)")
    p.add_argument("-n", "--scenes", type=int, default=500, help="eval/export: held-out scenes to grade or write")
    p.add_argument("--any-canvas", action="store_true", help="eval: scenes on canvases of any size and aspect "
                   "(long side 96-320 pixels, up to 1.8:1), not only the nine sizes of the standard grade")
    p.add_argument("--seed", type=int, default=0, help="scene: which scene to draw")
    p.add_argument("--out", type=Path, help="scene: output PNG (default scene.png); export: output directory "
                   "(default demo-bench)")


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        from llavakit.demo.recipe import train_demo

        model, report = train_demo(args.workdir, scale=args.scale, eval_scenes=args.scenes, install=args.install,
                                   resume=args.resume)
        print(report.table() if report else "", f"\nmodel: {model}", sep="")
        return 0
    if args.action == "eval":
        import llavakit
        from llavakit.demo.evaluate import evaluate

        report = evaluate(llavakit.load(args.model, dtype="float32", device="cpu"), n=args.scenes,
                          any_canvas=args.any_canvas)
        print(report.table())
        return 0 if report.passed() else 1
    if args.action == "export":
        from llavakit.demo.evaluate import export_benchmark

        out = args.out or Path("demo-bench")
        counts = export_benchmark(out, n=args.scenes)
        print(f"{out}: {counts['questions']} questions on {args.scenes} scenes ({counts['vqa']} scored by VQA "
              f"accuracy in vqa.jsonl, {counts['pope']} yes/no in pope.jsonl)", file=sys.stderr)
        return 0
    return _scene(args)


def _scene(args: argparse.Namespace) -> int:
    import random

    from llavakit.demo.questions import caption
    from llavakit.demo.scenes import random_scene

    scene = random_scene(random.Random(args.seed))
    out = args.out or Path("scene.png")
    scene.render().save(out)
    print(f"{out}: {caption(scene)}", file=sys.stderr)
    return 0
