"""`llavakit demo`: train, evaluate or look at the built-in demo model (synthetic shapes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "the built-in demo model: train it (about 30 min on 2 CPU cores) or evaluate it"
EXAMPLE = """examples:
  llavakit demo eval                           # grade the shipped demo model on 500 held-out scenes
  llavakit demo train --workdir /tmp/demo      # the whole recipe: data, two training stages, evaluation
  llavakit demo train --workdir /tmp/demo --install   # ... and make the result the built-in model
  llavakit demo scene --seed 3 --out scene.png # draw one synthetic scene
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["train", "eval", "scene"])
    p.add_argument("--workdir", type=Path, default=Path("demo-work"), help="train: where data and checkpoints go")
    p.add_argument("--scale", type=float, default=1.0, help="train: fraction of the full step count")
    p.add_argument("--install", action="store_true", help="train: copy the result into the package")
    p.add_argument("--model", default="demo", help="eval: the checkpoint to grade (default: the built-in one)")
    p.add_argument("-n", "--scenes", type=int, default=500, help="eval: held-out scenes to grade")
    p.add_argument("--seed", type=int, default=0, help="scene: which scene to draw")
    p.add_argument("--out", type=Path, default=Path("scene.png"), help="scene: output PNG")


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        from llavakit.demo.recipe import train_demo

        model, report = train_demo(args.workdir, scale=args.scale, eval_scenes=args.scenes, install=args.install)
        print(report.table() if report else "", f"\nmodel: {model}", sep="")
        return 0
    if args.action == "eval":
        import llavakit
        from llavakit.demo.evaluate import evaluate

        report = evaluate(llavakit.load(args.model, dtype="float32", device="cpu"), n=args.scenes)
        print(report.table())
        return 0 if report.passed() else 1
    return _scene(args)


def _scene(args: argparse.Namespace) -> int:
    import random

    from llavakit.demo.questions import caption
    from llavakit.demo.scenes import random_scene

    scene = random_scene(random.Random(args.seed))
    scene.render().save(args.out)
    print(f"{args.out}: {caption(scene)}", file=sys.stderr)
    return 0
