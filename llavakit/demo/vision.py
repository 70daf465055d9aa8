"""Stage 0 of the demo recipe: teach the CLIP-architecture tower (and the projector) what a scene holds,
patch by patch.

Why a stage of its own: trained from scratch through the language loss alone, the tower gets a weak,
late signal (a handful of answer tokens per image) and the decoder settles on the language prior first
-- colour and shape answers stayed at chance. Here every patch gets dense targets read off the
generator's ground truth, with linear heads, so the features the decoder later reads are linearly
decodable:

- the colour and kind of the shape covering the patch (or none), and whether its box is tall, even or
  wide (what tells a rectangle from a square),
- that shape's box in the padded square, as the two digits of each coordinate ("0.23" -> 2, 3), the
  digits the model writes when asked where something is,
- facts about the whole scene broadcast to every patch: how many shapes, how many of each kind, which
  (colour, kind) pairs are present.

Besides the heads, the projected features regress onto a *factor code* (FactorCode): each fact above as a
fixed random vector, summed. Linear heads only ask that a fact be decodable; the code asks that it be a
large, clean direction, which is what lets the decoder's attention pick the shape a question names out of
several (with the code itself as features the decoder learns that in ~200 steps, with head-trained
features it had not in 1,000; README, "The demo model").

The heads are thrown away afterwards; only the tower's and projector's weights go into the LLaVA checkpoint,
which stays a plain llava-hf checkpoint.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from tqdm.auto import tqdm

from llavakit.config import ImageConfig
from llavakit.demo.scenes import COLORS, SHAPES, Scene, draw_shape, random_scene
from llavakit.models.clip import CLIPVisionTower
from llavakit.models.llava import LlavaForConditionalGeneration
from llavakit.processing.image import preprocess

COLOR_NAMES = list(COLORS)
MAX_SHAPES = 4
CODE_WEIGHT = 4.0  # the factor-code regression against the heads' cross-entropies
COVER = 0.12  # a patch belongs to a shape when the shape covers at least this fraction of it
# Head sizes, in the order of the output columns.
HEADS = {"color": 1 + len(COLOR_NAMES), "kind": 1 + len(SHAPES), "aspect": 3, "mask": 16, "tens": 4 * 11,
         "units": 4 * 10, "count": MAX_SHAPES + 2, "count_kind": len(SHAPES) * (MAX_SHAPES + 2),
         "present": len(COLOR_NAMES) * len(SHAPES)}


def owner_map(scene: Scene, grid: int, sub: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(grid*grid,) index + 1 of the shape owning each patch of the padded square, 0 for none; and
    (grid*grid, 16) which cells of a 4x4 split of each patch are mostly covered by a shape."""
    labels = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(labels)
    for i, s in enumerate(scene.shapes):
        draw_shape(draw, s.kind, s.box, i + 1)
    side = max(scene.width, scene.height)
    square = Image.new("L", (side, side), 0)
    square.paste(labels, ((side - scene.width) // 2, (side - scene.height) // 2))
    arr = np.asarray(square.resize((grid * sub, grid * sub), Image.Resampling.NEAREST))
    cells = arr.reshape(grid, sub, grid, sub).transpose(0, 2, 1, 3).reshape(grid * grid, sub * sub)
    cover = np.stack([(cells == k).mean(1) for k in range(len(scene.shapes) + 1)], axis=1)
    cover[:, 0] = COVER - 1e-6  # "none" wins unless a shape covers enough of the patch
    q = sub // 4
    quarters = (cells.reshape(-1, 4, q, 4, q) > 0).mean((2, 4)).reshape(-1, 16) >= 0.5
    return cover.argmax(1), quarters.astype(np.float32)


def scene_targets(scene: Scene, grid: int) -> dict[str, torch.Tensor]:
    """Per-patch class targets (-100 where a target does not apply) and the scene-level ones."""
    owner, mask = owner_map(scene, grid)
    n = grid * grid
    color = np.zeros(n, np.int64)
    kind = np.zeros(n, np.int64)
    tens = np.full((n, 4), -100, np.int64)
    units = np.full((n, 4), -100, np.int64)
    aspect = np.full(n, -100, np.int64)
    for i, s in enumerate(scene.shapes):
        cells = owner == i + 1
        ratio = (s.box[2] - s.box[0]) / (s.box[3] - s.box[1])
        aspect[cells] = 0 if ratio < 0.8 else 2 if ratio > 1.25 else 1  # tall, even, wide
        color[cells] = COLOR_NAMES.index(s.color) + 1
        kind[cells] = SHAPES.index(s.kind) + 1
        hundredths = [round(v * 100) for v in scene.norm_box(s)]
        tens[cells] = [h // 10 for h in hundredths]
        units[cells] = [h % 10 for h in hundredths]
    present = np.zeros(len(COLOR_NAMES) * len(SHAPES), np.float32)
    for s in scene.shapes:
        present[COLOR_NAMES.index(s.color) * len(SHAPES) + SHAPES.index(s.kind)] = 1
    return {"owner": torch.from_numpy(owner.astype(np.int64)), "color": torch.from_numpy(color),
            "mask": torch.from_numpy(mask), "kind": torch.from_numpy(kind), "aspect": torch.from_numpy(aspect),
            "tens": torch.from_numpy(tens), "units": torch.from_numpy(units), "count": torch.tensor(len(scene.shapes)),
            "count_kind": torch.tensor([sum(s.kind == k for s in scene.shapes) for k in SHAPES]),
            "present": torch.from_numpy(present)}


class SceneBatches(torch.utils.data.IterableDataset):
    """An endless stream of (pixel values, targets) batches of fresh scenes; each worker its own seed."""

    def __init__(self, image_cfg: ImageConfig, grid: int, batch: int, seed: int, max_shapes: int = MAX_SHAPES):
        self.image_cfg, self.grid, self.batch, self.seed, self.max_shapes = image_cfg, grid, batch, seed, max_shapes

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1000 + (info.id if info else 0))
        while True:
            scenes = [random_scene(rng, self.max_shapes) for _ in range(self.batch)]
            pixels = torch.cat([preprocess(s.render(), self.image_cfg)[0] for s in scenes])
            targets = [scene_targets(s, self.grid) for s in scenes]
            yield pixels, {k: torch.stack([t[k] for t in targets]) for k in targets[0]}


class FactorCode(nn.Module):
    """What a patch's feature should say, written out: a sum of fixed random vectors, one per fact (its
    colour, its kind, its shape's box digits; the scene's counts and which shapes it holds). Regressing the
    projected features onto this code makes every fact a large, clean direction of its own -- with the
    code itself as image features, the decoder learns to pick the shape a question names out of several
    in a couple of hundred steps; with features that merely let linear heads classify, it did not learn
    that in a thousand."""

    WEIGHTS: ClassVar[dict[str, float]] = {"color": 1.0, "kind": 1.5, "tens": 0.5, "units": 0.25, "scene": 0.5}

    def __init__(self, dim: int, seed: int = 1234):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def table(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, dim, generator=g)

        self.register_buffer("color", table(1 + len(COLOR_NAMES)))
        self.register_buffer("kind", table(1 + len(SHAPES)))
        self.register_buffer("tens", table(4, 11))
        self.register_buffer("units", table(4, 10))
        self.register_buffer("count", table(MAX_SHAPES + 2))
        self.register_buffer("count_kind", table(len(SHAPES), MAX_SHAPES + 2))
        self.register_buffer("present", table(len(COLOR_NAMES) * len(SHAPES)))

    def forward(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """Targets of a batch -> (N, P, dim) codes."""
        w = self.WEIGHTS
        code = w["color"] * self.color[t["color"]] + w["kind"] * self.kind[t["kind"]]
        for name in ("tens", "units"):
            digits = t[name]  # (N, P, 4), -100 off shapes
            for j in range(4):
                on = (digits[..., j] >= 0)[..., None]
                code = code + w[name] * on * getattr(self, name)[j][digits[..., j].clamp(min=0)]
        scene = self.count[t["count"]] + t["present"] @ self.present
        for k in range(len(SHAPES)):
            scene = scene + self.count_kind[k][t["count_kind"][:, k]]
        return code + w["scene"] * scene[:, None]


class SceneProbe(nn.Module):
    """The tower and the projector, with linear heads on the projected patch features (the heads are
    discarded after training) and the factor code the features regress onto. The heads sit after the
    projector, not the tower: when the language stages trained a fresh projector, it kept the shape
    features the decoder learnt to use early and lost the colours (a linear probe read 96% of colours off
    the tower but 46% off that projector's output)."""

    def __init__(self, tower: CLIPVisionTower, projector: nn.Module, dim: int):
        super().__init__()
        self.tower, self.projector = tower, projector
        self.heads = nn.Linear(dim, sum(HEADS.values()))
        self.code = FactorCode(dim)

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.projector(self.tower(pixels)[:, 1:])  # (N, P, D), CLS dropped as LLaVA does
        out = self.heads(feats)  # (N, P, sum of heads)
        return {"features": feats, **dict(zip(HEADS, out.split(list(HEADS.values()), dim=-1), strict=True))}


def probe_losses(out: dict[str, torch.Tensor], t: dict[str, torch.Tensor], code: FactorCode) -> dict[str, torch.Tensor]:
    """One loss per head (the scene-level heads are trained on every patch: the fact is broadcast) and the
    regression onto the factor code, as the share of the code's variance left unexplained."""
    p = out["color"].shape[1]
    wanted = code(t)

    def ce(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, k), target.reshape(-1))

    def per_patch(v: torch.Tensor) -> torch.Tensor:
        return v[:, None].expand(-1, p, *v.shape[1:])

    return {
        "color": ce(out["color"], t["color"], HEADS["color"]),
        # Kind only where there is a shape (the colour head already tells shape from background), and
        # weighted up: it is the slowest target to learn, needing the shape's outline across patches.
        "kind": 2 * F.cross_entropy(out["kind"][t["kind"] > 0], t["kind"][t["kind"] > 0]),
        # Tall, even or wide: what tells a rectangle from a square (the kinds confused most without it).
        "aspect": ce(out["aspect"], t["aspect"], 3),
        "mask": F.binary_cross_entropy_with_logits(out["mask"], t["mask"]),
        "tens": ce(out["tens"], t["tens"], 11),
        "units": 0.5 * ce(out["units"], t["units"], 10),
        "count": ce(out["count"], per_patch(t["count"]), HEADS["count"]),
        "count_kind": ce(out["count_kind"], per_patch(t["count_kind"]), MAX_SHAPES + 2),
        # Few of the 45 pairs are present in a scene: weighted so that "nothing is there" does not win.
        "present": F.binary_cross_entropy_with_logits(out["present"], per_patch(t["present"]),
                                                      pos_weight=torch.tensor(8.0)),
        "code": CODE_WEIGHT * F.mse_loss(out["features"], wanted) / wanted.var(),
    }


@dataclass
class ProbeAccuracy:
    """Per-head accuracy on held-out scenes: patches of a shape for the patch heads, scenes for the
    scene-level ones (read off the mean over patches)."""

    color: float
    kind: float
    shape_kind: float
    tens: float
    count: float
    count_kind: float
    present: float
    feature_r2: float  # how much of the factor code's variance the features explain
    confusion: list[list[int]] | None = None  # shape kinds: rows true, columns predicted

    def __str__(self) -> str:
        return " ".join(f"{k}={v:.1%}" for k, v in self.__dict__.items() if k != "confusion")


@torch.no_grad()
def probe_accuracy(probe: SceneProbe, pixels: torch.Tensor, t: dict[str, torch.Tensor]) -> ProbeAccuracy:
    out = probe(pixels)
    on = t["color"] > 0

    def mean(x: torch.Tensor) -> float:
        return float(x.float().mean())

    tens_on = t["tens"] >= 0
    target = probe.code(t)
    # Kind per shape: the patches of one shape vote (summed logits), as a reader attending to them would.
    kind_logits = torch.zeros(t["kind"].shape[0], MAX_SHAPES + 1, HEADS["kind"])
    kind_logits.scatter_add_(1, t["owner"][..., None].expand(-1, -1, HEADS["kind"]), out["kind"])
    truth = torch.zeros(t["kind"].shape[0], MAX_SHAPES + 1, dtype=torch.long).scatter_(1, t["owner"], t["kind"])
    has = truth[:, 1:] > 0
    return ProbeAccuracy(
        color=mean(out["color"].argmax(-1)[on] == t["color"][on]),
        shape_kind=mean(kind_logits[:, 1:].argmax(-1)[has] == truth[:, 1:][has]),
        kind=mean(out["kind"].argmax(-1)[on] == t["kind"][on]),
        tens=mean(out["tens"].unflatten(-1, (4, 11)).argmax(-1)[tens_on] == t["tens"][tens_on]),
        count=mean(out["count"].mean(1).argmax(-1) == t["count"]),
        count_kind=mean(out["count_kind"].mean(1).unflatten(-1, (len(SHAPES), -1)).argmax(-1) == t["count_kind"]),
        present=mean((out["present"].mean(1) > 0) == (t["present"] > 0.5)),
        feature_r2=1 - float(F.mse_loss(out["features"], target) / target.var()),
        confusion=torch.zeros(HEADS["kind"], HEADS["kind"], dtype=torch.long).index_put_(
            (truth[:, 1:][has], kind_logits[:, 1:].argmax(-1)[has]), torch.tensor(1), accumulate=True)[1:, 1:].tolist(),
    )


def pretrain_vision(model: LlavaForConditionalGeneration, steps: int, batch: int = 32, lr: float = 1e-3,
                    seed: int = 0, workers: int = 1, log=print, max_shapes: int = MAX_SHAPES) -> ProbeAccuracy:
    """Train the model's tower and projector in place on the dense scene targets; returns the held-out
    probe accuracy."""
    torch.manual_seed(seed)
    image_cfg, grid = model.cfg.image, model.cfg.vision.grid_size
    probe = SceneProbe(model.vision_tower, model.projector, model.cfg.text.hidden_size)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    held_out = next(iter(SceneBatches(image_cfg, grid, 256, seed=seed + 777)))
    loader = torch.utils.data.DataLoader(SceneBatches(image_cfg, grid, batch, seed, max_shapes), batch_size=None,
                                         num_workers=workers, persistent_workers=workers > 0)
    probe.train()
    # SceneBatches never ends: range(steps) is what stops the loop, so zip must not be strict.
    bar = tqdm(zip(range(steps), loader, strict=False), total=steps, desc="vision stage", unit="step",
               disable=None)
    for step, (pixels, targets) in bar:
        losses = probe_losses(probe(pixels), targets, probe.code)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(probe.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
            probe.eval()
            acc = probe_accuracy(probe, *held_out)
            probe.train()
            log(f"vision stage step {step + 1}/{steps}: loss {loss.item():.3f}; held-out {acc}")
    probe.eval()
    return probe_accuracy(probe, *held_out)
