"""Loading an open_clip checkpoint as a judge of captions: the files, the weights, the image transform.

Accepted checkpoints (all local):
  a folder in open_clip's Hugging Face hub layout: open_clip_config.json ({"model_cfg", "preprocess_cfg"})
      + open_clip_model.safetensors or open_clip_pytorch_model.bin (as laion/CLIP-ViT-H-14-laion2B-s32B-b79K);
  a folder or a single .safetensors / .bin / .pt / .pth file of open_clip weights, with --clip-arch naming the
      architecture (a name from clip_model.PRESETS or an open_clip model-config JSON).
`.bin`/`.pt` files are read with torch.load(weights_only=True): a pickle cannot run code here. OpenAI's
original TorchScript archives are not plain state dicts and are refused; their open_clip copies
(e.g. timm/vit_base_patch32_clip_224.openai) load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from llavakit.eval.clip_model import PRESETS, Clip, ClipConfig
from llavakit.eval.clip_tokenizer import ClipTokenizer, find_tokenizer

CONFIG_NAME = "open_clip_config.json"
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# open_clip's `CLIP` keeps the text tower's parts at the top level of its state dict; `CustomTextCLIP`
# (and our model) nest them under "text.". Keys not listed here or under "visual."/"text." are not weights
# the judge uses (logit_scale, logit_bias, attn_mask).
_TEXT_TOP_LEVEL = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_UNUSED = ("logit_scale", "logit_bias", "attn_mask", "text.attn_mask")


@dataclass(slots=True)
class Preprocess:
    """open_clip's eval transform (PreprocessCfg): resize, center crop, scale to [0, 1], normalize."""

    size: int = 224
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self):
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"open_clip resize_mode {self.resize_mode!r} is not supported; "
                             "expected shortest or squash")
        if self.interpolation not in ("bicubic", "bilinear", "random"):  # open_clip evaluates "random" as bicubic
            raise ValueError(f"open_clip interpolation {self.interpolation!r} is not supported")

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """An RGB image -> (3, size, size) float32, as torchvision's Resize/CenterCrop/ToTensor/Normalize."""
        resample = Image.Resampling.BILINEAR if self.interpolation == "bilinear" else Image.Resampling.BICUBIC
        if self.resize_mode == "squash":
            img = img.resize((self.size, self.size), resample)
        else:
            img = _center_crop(img.resize(_shortest_side_to(img.size, self.size), resample), self.size)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std


def _shortest_side_to(size_wh: tuple[int, int], side: int) -> tuple[int, int]:
    """(w, h) with the shorter side = `side` and the longer int(side * long / short), as torchvision."""
    w, h = size_wh
    return (side, int(side * h / w)) if w <= h else (int(side * w / h), side)


def _center_crop(img: Image.Image, side: int) -> Image.Image:
    """torchvision's CenterCrop offsets (round half to even); the image is never smaller than `side` here."""
    left, top = round((img.width - side) / 2.0), round((img.height - side) / 2.0)
    return img.crop((left, top, left + side, top + side))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def _arch_config(arch: str) -> dict:
    """An open_clip model config from a preset name or a model-config JSON file."""
    if arch in PRESETS:
        return PRESETS[arch]
    if arch.endswith(".json") and Path(arch).is_file():
        data = _read_json(Path(arch))
        return data.get("model_cfg", data)
    raise ValueError(f"unknown --clip-arch {arch!r}; expected an open_clip model-config JSON or one of "
                     f"{', '.join(PRESETS)}")


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in WEIGHT_NAMES:
        if (path / name).is_file():
            return path / name
    raise ValueError(f"no CLIP weights in {path}; expected one of {', '.join(WEIGHT_NAMES)}")


def resolve_checkpoint(path: Path, arch: str | None) -> tuple[Path, ClipConfig, Preprocess]:
    """(weights file, model config, image transform) for --clip-model and --clip-arch."""
    if not path.exists():
        raise ValueError(f"CLIP checkpoint {path} does not exist")
    config_file = path / CONFIG_NAME if path.is_dir() else path.with_name(CONFIG_NAME)
    hub = _read_json(config_file) if config_file.is_file() else {}
    if arch is not None:
        model_cfg = _arch_config(arch)
    elif "model_cfg" in hub:
        model_cfg = hub["model_cfg"]
    else:
        raise ValueError(f"{path} has no {CONFIG_NAME} with a 'model_cfg'; pass --clip-arch NAME "
                         f"(e.g. ViT-H-14, ViT-B-32-quickgelu for OpenAI weights)")
    cfg = ClipConfig.from_open_clip(model_cfg)
    pre_cfg = {k: v for k, v in hub.get("preprocess_cfg", {}).items()
               if k in ("mean", "std", "interpolation", "resize_mode") and v is not None}
    return _weights_file(path), cfg, Preprocess(size=cfg.vision.image_size, **pre_cfg)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; a training checkpoint's {"state_dict": ...} and DDP's "module." are unwrapped."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt files raise many types; the user needs one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"could not read CLIP weights {path} ({reason}); expected open_clip weights "
                         "(.safetensors, or a .bin/.pt state dict; TorchScript archives are not supported)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def our_name(key: str) -> str | None:
    """The judge's parameter name for an open_clip state-dict key; None for keys it does not use."""
    if key.startswith(("visual.", "text.")):
        return None if key in _UNUSED else key
    if key.startswith(_TEXT_TOP_LEVEL):
        return "text." + key
    return None


def load_weights(model: Clip, state: dict[str, torch.Tensor], source: Path) -> None:
    """Give `model` (built on the meta device) the checkpoint's tensors as float32; missing, surplus or
    mis-shaped tensors are an error naming one, so a wrong --clip-arch fails before any scoring."""
    shapes = {name: p.shape for name, p in model.named_parameters()}
    named = {our_name(k): v for k, v in state.items() if our_name(k) is not None}
    missing, surplus = sorted(set(shapes) - set(named)), sorted(set(named) - set(shapes))
    if missing or surplus:
        problems = [f"{len(names)} weights {what} (e.g. {names[0]})"
                    for names, what in ((missing, "missing"), (surplus, "unexpected")) if names]
        raise ValueError(f"{source} does not fit the CLIP architecture: {', '.join(problems)}; check --clip-arch")
    for name, shape in shapes.items():
        if named[name].shape != shape:
            raise ValueError(f"{source}: {name} has shape {tuple(named[name].shape)}, the architecture expects "
                             f"{tuple(shape)}; check --clip-arch")
    model.load_state_dict({k: v.float() for k, v in named.items()}, strict=True, assign=True)


class ClipJudge:
    """A loaded CLIP model with its tokenizer and transform; embeds images and texts, L2-normalised, float32.

    The judge always runs in float32: its own rounding should not add to the differences it measures.
    """

    def __init__(self, model: Clip, tokenizer: ClipTokenizer, preprocess: Preprocess, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer, self.preprocess, self.device = tokenizer, preprocess, torch.device(device)

    @torch.inference_mode()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(img) for img in images]).to(self.device)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1).cpu()

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """(embeddings, truncated): CLIP reads at most context_length - 2 tokens of each text."""
        ids, truncated = self.tokenizer(texts)
        return F.normalize(self.model.encode_text(ids.to(self.device)).float(), dim=-1).cpu(), truncated


def load_judge(path: str | Path, arch: str | None = None, tokenizer: str | Path | None = None,
               device: str = "cpu") -> ClipJudge:
    """A `ClipJudge` from a local open_clip checkpoint (see the module docstring for the layouts)."""
    path = Path(path)
    weights, cfg, preprocess = resolve_checkpoint(path, arch)
    vocab = find_tokenizer(path, Path(tokenizer) if tokenizer else None)
    with torch.device("meta"):  # no random init of weights about to be replaced (ViT-H: 1B of them)
        model = Clip(cfg)
    load_weights(model, read_state_dict(weights), weights)
    return ClipJudge(model, ClipTokenizer.from_file(vocab, cfg.text.context_length), preprocess, device)
