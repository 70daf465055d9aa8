"""`llavakit demo train`: the recipe that makes the built-in demo model, then grades it and (optionally)
installs it into the package.

Stage 0 (demo/vision.py) trains the CLIP-architecture tower alone on dense targets read off the
generator (per patch: colour, kind, aspect, outline, box digits; per scene: counts and which shapes are
present), through the projector, with linear heads that are then dropped and a regression of the
features onto a fixed code of those facts. Without it the decoder learnt only the language prior:
through the language loss alone a from-scratch tower gets too weak a signal. The language stages are
llavakit's own trainer (`stage="finetune"`, tower frozen, decoder trained, the projector too from the
third stage on) on conversations, from scenes of one shape to scenes of up to four, from stage 9 on, on
canvases of any size (STAGES; why each stage exists and what it measured: docs/demo-model.md,
"Recipe stages").

A run keeps its settings in WORKDIR/recipe.json; `resume=True` (`llavakit demo train --resume`) goes on
with it: the tower and finished stages are kept, an interrupted stage goes on from its last checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

import llavakit
from llavakit.demo.build import write_dataset, write_initial_checkpoint
from llavakit.demo.evaluate import Report, evaluate
from llavakit.demo.questions import KINDS
from llavakit.train.checkpoint import STATE_FILE, sorted_checkpoints
from llavakit.train.config import make_config
from llavakit.train.recipe import train
from llavakit.weights.save import save_llava_hf

PACKAGED = Path(__file__).parent / "model"
STAGE1_KINDS = (["caption", "color", "shape", "count", "exists", "where"], [1, 2, 2, 1, 2, 2])
EXISTENCE_KINDS = (KINDS, [1, 2, 2, 2, 6, 3, 2])  # weights in the order of questions.KINDS
COUNT_KINDS = (KINDS, [1, 2, 2, 6, 6, 3, 2])
LONG_KINDS = (KINDS, [1, 2, 2, 6, 8, 3, 4])


@dataclass(frozen=True, slots=True)
class Stage:
    """One language stage of the recipe: llavakit's trainer (`finetune`, tower frozen) on conversations
    drawn by build.write_dataset with these settings."""

    name: str
    steps: int  # at scale 1
    lr: float
    kinds: tuple[list[str], list[int]] | None = None  # (question kinds, their weights); None: questions' defaults
    max_shapes: int = 4  # shapes per scene at most
    projector_lr: float | None = None  # None: the projector stays frozen
    any_canvas: bool = False  # canvases of any size rather than the nine of the grade's scenes
    hard_negatives: float = 0.0  # see questions.ask
    kind_only: float = 0.0  # see questions.ask
    data_seed: int | None = None  # added to 100 x the recipe's seed; None: the stage's number

    def __post_init__(self):
        assert self.steps > 0 and self.lr > 0 and self.max_shapes >= 1, self
        assert 0.0 <= self.hard_negatives <= 1.0 and 0.0 <= self.kind_only <= 1.0, self
        assert self.kinds is None or len(self.kinds[0]) == len(self.kinds[1]), self


STAGES = (  # one line each on why; the history and measured numbers: docs/demo-model.md, "Recipe stages"
    Stage("stage1", 200, 1e-3, STAGE1_KINDS, max_shapes=1),  # one shape: what to read, not yet which shape
    Stage("stage2", 300, 1e-3, max_shapes=2),  # two: which shape a question is about (binding), relations
    Stage("stage3", 700, 8e-4, projector_lr=2e-4),  # up to four; the projector trains too, slowly (as in LLaVA)
    Stage("stage4", 300, 5e-4, projector_lr=2e-4),  # 4 to 8: the same again, warmed up anew; each still paid
    Stage("stage5", 300, 5e-4, projector_lr=2e-4),
    Stage("stage6", 300, 5e-4, projector_lr=2e-4),
    Stage("stage7", 300, 5e-4, projector_lr=2e-4),
    Stage("stage8", 300, 5e-4, projector_lr=2e-4),
    Stage("stage9", 300, 5e-4, projector_lr=2e-4, any_canvas=True),  # 9 to 13: pictures not drawn on the 9 canvases
    Stage("stage10", 300, 5e-4, projector_lr=2e-4, any_canvas=True),
    Stage("stage11", 300, 5e-4, projector_lr=2e-4, any_canvas=True),
    Stage("stage12", 300, 5e-4, projector_lr=2e-4, any_canvas=True),
    Stage("stage13", 300, 5e-4, projector_lr=2e-4, any_canvas=True),
    # 14 on: absent names that share a colour or kind with the scene ("Is there a green circle?" by a red one)
    Stage("stage14", 300, 5e-4, projector_lr=2e-4, any_canvas=True, hard_negatives=0.5),
    Stage("stage15", 300, 5e-4, EXISTENCE_KINDS, projector_lr=2e-4, any_canvas=True, hard_negatives=1.0),
    Stage("stage16", 300, 5e-4, EXISTENCE_KINDS, projector_lr=2e-4, any_canvas=True, hard_negatives=1.0),
    # 17 and 18: per-kind counts ("How many circles?"), count questions three times as many
    Stage("stage17", 300, 5e-4, COUNT_KINDS, projector_lr=2e-4, any_canvas=True, hard_negatives=1.0),
    Stage("stage18", 300, 5e-4, COUNT_KINDS, projector_lr=2e-4, any_canvas=True, hard_negatives=1.0),
    # 19 to 21: long stages that teach the colour check; 19's data seed is that of the run that found it
    Stage("stage19", 900, 5e-4, LONG_KINDS, projector_lr=2e-4, any_canvas=True, hard_negatives=1.0, kind_only=0.6,
          data_seed=1907),
    Stage("stage20", 900, 5e-4, LONG_KINDS, projector_lr=2e-4, any_canvas=True, hard_negatives=1.0, kind_only=0.6),
    Stage("stage21", 900, 5e-4, LONG_KINDS, projector_lr=2e-4, any_canvas=True, hard_negatives=1.0, kind_only=0.6),
)
BATCH = 32
MICRO_BATCHES = 4  # each batch run as 4 of similar length: same gradient, ~1.3x faster steps here
VISION_STEPS = 3000  # stage 0, the tower alone on dense scene targets (demo/vision.py)
SAVE_STEPS = 300  # a resumable checkpoint every 300 steps of a language stage (about 6.5 minutes here)
RUN_FILE = "recipe.json"


def train_demo(workdir: Path, scale: float = 1.0, seed: int = 0, eval_scenes: int = 500,
               install: bool = False, resume: bool = False) -> tuple[Path, Report | None]:
    """Build data, train every stage, grade; returns the final checkpoint and the report. `resume`: go on
    with the run already in `workdir` (same scale and seed) instead of refusing to touch it."""
    workdir = Path(workdir)
    claim_workdir(workdir, scale, seed, resume)
    model = workdir / "init"
    if resume and (model / "config.json").is_file():
        print(f"stage 0: finished earlier, kept ({model})", flush=True)
    else:
        tmp = workdir / "init.tmp"  # written whole, then renamed: an interrupted stage 0 is redone
        shutil.rmtree(tmp, ignore_errors=True)
        write_initial_checkpoint(tmp, seed=seed, vision_steps=max(2, round(VISION_STEPS * scale)))
        shutil.rmtree(model, ignore_errors=True)
        tmp.rename(model)
    for k, stage in enumerate(STAGES):
        done = workdir / stage.name / "final"
        if resume and (done / STATE_FILE).is_file():  # the trainer writes final/ whole, then renames it
            print(f"{stage.name}: finished earlier, kept ({done})", flush=True)
            model = done
            continue
        model = run_stage(workdir, k, model, scale=scale, seed=seed, resume=resume)
    report = None
    if eval_scenes:
        report = evaluate(llavakit.load(model, dtype="float32", device="cpu"), n=eval_scenes)
        (workdir / "eval.txt").write_text(report.table() + "\n")
        (workdir / "eval.json").write_text(json.dumps({"right": report.right, "total": report.total}))
    if install:
        install_model(model, PACKAGED)
    return model, report


def claim_workdir(workdir: Path, scale: float, seed: int, resume: bool) -> None:
    """Record this run's settings in workdir/recipe.json, refusing a workdir that holds something else:
    another run's work is never overwritten, and a run goes on only with the settings it started with."""
    settings = {"scale": scale, "seed": seed, "stages": [s.name for s in STAGES]}
    record = workdir / RUN_FILE
    if record.is_file():
        try:
            earlier = json.loads(record.read_text())
        except ValueError:
            raise ValueError(f"{record} is not valid JSON; remove it or choose another --workdir") from None
        if not resume:
            raise ValueError(f"{workdir} already holds a demo run; pass --resume to go on with it, or choose "
                             f"another --workdir")
        if earlier != settings:
            diff = ", ".join(f"{k} {earlier.get(k)!r} (now {v!r})" for k, v in settings.items() if earlier.get(k) != v)
            raise ValueError(f"{workdir} holds a demo run with other settings: {diff}; resume it with those, or "
                             f"choose another --workdir")
        return
    if workdir.is_dir() and any(workdir.iterdir()):
        raise ValueError(f"{workdir} is not empty and holds no demo run ({RUN_FILE}); choose an empty or new "
                         f"--workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(settings) + "\n")


def run_stage(workdir: Path, k: int, model: Path, scale: float = 1.0, seed: int = 0, resume: bool = False) -> Path:
    """Language stage k of STAGES from checkpoint `model`: write its data, train; returns its final model.
    `resume`: go on from the stage's last checkpoint when it has one (its data is drawn again, the same)."""
    stage = STAGES[k]
    n_steps = max(2, round(stage.steps * scale))
    data_seed = seed * 100 + (k + 1 if stage.data_seed is None else stage.data_seed)
    kinds, weights = stage.kinds or (None, None)
    data = write_dataset(workdir / f"{stage.name}-data", n_steps * BATCH, seed=data_seed, turns=(4, 8), kinds=kinds,
                         weights=weights, max_shapes=stage.max_shapes, any_canvas=stage.any_canvas,
                         hard_negatives=stage.hard_negatives, kind_only=stage.kind_only)
    train(make_config(model=str(model), data_path=str(data), image_folder=str(data.parent),
                      output_dir=str(workdir / stage.name), stage="finetune", unfreeze_vision=False,
                      freeze_mm_mlp_adapter=stage.projector_lr is None, mm_projector_lr=stage.projector_lr,
                      per_device_train_batch_size=BATCH, max_steps=n_steps,
                      learning_rate=stage.lr, warmup_ratio=0.03, weight_decay=0.0, seed=seed,
                      save_steps=SAVE_STEPS, save_total_limit=1,
                      resume_from_checkpoint="latest" if resume else None,
                      model_max_length=512, micro_batches_by_length=MICRO_BATCHES))
    for checkpoint in sorted_checkpoints(workdir / stage.name):  # final/ holds the stage now (~50 MB each)
        shutil.rmtree(checkpoint)
    return workdir / stage.name / "final"


def install_model(checkpoint: Path, target: Path = PACKAGED) -> Path:
    """Copy a trained demo checkpoint into the package as float16 (about 11 MB)."""
    pipe = llavakit.load(checkpoint, dtype="float16", device="cpu")
    shutil.rmtree(target, ignore_errors=True)
    d = pipe.config.vision.hidden_size
    extra = {"vision_tower.vision_model.post_layernorm.weight": torch.ones(d),
             "vision_tower.vision_model.post_layernorm.bias": torch.zeros(d)}
    return save_llava_hf(pipe.model, target, tokenizer=pipe.tokenizer, extra_tensors=extra)
