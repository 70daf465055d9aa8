"""`llavakit demo`: train, evaluate or look at the built-in demo model (synthetic shapes)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llavakit.cli.checks import check_output
from llavakit.cli.common import (
    HelpFormatter,
    UsageError,
    add_quantization_flags,
    add_threads_flag,
    number,
    quantization_arg,
    set_threads,
)

HELP = "the built-in demo model: train it (about 290 minutes on 2 CPU cores) or evaluate it"
EXAMPLE = """examples:
  llavakit demo eval                           # grade the shipped demo model on 500 held-out scenes
  llavakit demo eval --quantization w8a16      # ... with its language model in int8
  llavakit demo train --workdir /tmp/demo      # the whole recipe: vision stage, language stages, evaluation
  llavakit demo train --workdir /tmp/demo --install   # ... and make the result the built-in model
  llavakit demo train --workdir /tmp/demo --resume    # go on with a run that was stopped
  llavakit demo scene --seed 3 --out scene.png # draw one synthetic scene
  llavakit demo export --out demo-bench -n 200 # held-out scenes as a benchmark for predict + eval score
"""


ACTIONS = {
    "train": "the whole recipe (about 290 minutes on 2 CPU cores): vision stage, language stages, evaluation",
    "eval": "grade a demo checkpoint (default: the built-in one) on held-out synthetic scenes",
    "scene": "draw one synthetic scene as a PNG (its caption on stderr)",
    "export": "write held-out scenes as a benchmark (questions + annotations) for predict + eval score",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    adders = {"train": _add_train_arguments, "eval": _add_eval_arguments, "scene": _add_scene_arguments,
              "export": _add_export_arguments}
    for name, add in adders.items():
        examples = [line for line in EXAMPLE.splitlines() if f"llavakit demo {name} " in line + " "]
        s = sub.add_parser(name, help=ACTIONS[name], description=ACTIONS[name],
                           epilog="\n".join(["examples:", *examples]) + "\n", formatter_class=HelpFormatter)
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        add(s)
        if name in ("train", "eval"):
            add_threads_flag(s)


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", type=Path, help="where data and checkpoints go (required: the recipe takes hours "
                   "and fills it with data and checkpoints)")
    p.add_argument("--scale", type=number(float, above=0), default=1.0, help="fraction of the full step count")
    p.add_argument("--install", action="store_true", help="copy the result into the package (the built-in model)")
    p.add_argument("--resume", action="store_true", help="go on with the run in --workdir (finished stages are "
                   "kept; an interrupted one goes on from its last checkpoint, saved every 300 steps)")
    p.add_argument("-n", "--scenes", type=number(int, 0), default=500,
                   help="held-out scenes graded at the end (0: no grade)")


def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="the checkpoint to grade (demo: the built-in one)")
    p.add_argument("-n", "--scenes", type=number(int, 1), default=500, help="held-out scenes to grade")
    p.add_argument("--any-canvas", action="store_true", help="scenes on canvases of any size and aspect "
                   "(long side 96-320 pixels, up to 1.8:1), not only the nine sizes of the standard grade")
    add_quantization_flags(p)


def _add_scene_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="which scene to draw")
    p.add_argument("--out", type=Path, default=Path("scene.png"), help="the PNG to write")


def _add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo-bench"), help="output directory")
    p.add_argument("-n", "--scenes", type=number(int, 1), default=500, help="held-out scenes to write")


def run(args: argparse.Namespace) -> int:
    if args.action in ("train", "eval"):
        set_threads(args)
    if args.action == "train":
        from llavakit.demo.recipe import train_demo

        if args.workdir is None:
            raise UsageError("demo train runs for hours (about 290 minutes on 2 CPU cores) and fills a directory with "
                             "data and checkpoints: pass --workdir DIR to start (--workdir DIR --resume goes on with "
                             "a stopped run)")
        model, report = train_demo(args.workdir, scale=args.scale, eval_scenes=args.scenes, install=args.install,
                                   resume=args.resume)
        print(report.table() if report else "", f"\nmodel: {model}", sep="")
        return 0
    if args.action == "eval":
        import llavakit
        from llavakit.demo.evaluate import evaluate

        pipe = llavakit.load(args.model, dtype="float32", device="cpu", quantization=quantization_arg(args))
        report = evaluate(pipe, n=args.scenes, any_canvas=args.any_canvas)
        print(report.table())
        return 0 if report.passed() else 1
    if args.action == "export":
        from llavakit.demo.evaluate import export_benchmark

        out = args.out
        check_output(out, "--out", makedirs=True, directory=True)
        counts = export_benchmark(out, n=args.scenes)
        print(f"{out}: {counts['questions']} questions on {args.scenes} scenes ({counts['vqa']} scored by VQA "
              f"accuracy in vqa.jsonl, {counts['pope']} yes/no in pope.jsonl)", file=sys.stderr)
        return 0
    return _scene(args)


def _scene(args: argparse.Namespace) -> int:
    import random

    from llavakit.demo.questions import caption
    from llavakit.demo.scenes import random_scene

    check_output(args.out, "--out")
    scene = random_scene(random.Random(args.seed))
    out = args.out
    scene.render().save(out)
    print(f"{out}: {caption(scene)}", file=sys.stderr)
    return 0
