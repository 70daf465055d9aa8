"""Writes tests/eval/assets/open_clip/: two tiny random open_clip checkpoints, a tiny BPE vocabulary, three
images, and what open_clip itself computes from them (golden.safetensors + golden.json).

Run by hand, with open_clip_torch importable (it needs a torchvision that imports beside your torch):
    python tests/eval/assets/make_open_clip_golden.py
The tests read only its outputs, so CI needs neither open_clip nor torchvision. (These files were made with
open_clip_torch 3.3.0 and PyPI's torchvision 0.28.0 beside the CPU torch 2.13.0, in a throwaway venv whose
torchvision/__init__.py had `_autograd_registrations, _meta_registrations` dropped from its import list: that
wheel is a CUDA build whose C ops cannot load on CPU torch, and open_clip needs only torchvision.transforms.)

"standard": open_clip's CLIP layout (text tower at the top level), GELU, class-token pooling, saved as
open_clip_model.safetensors with its vocabulary beside it. "variant": the CustomTextCLIP layout ("text."),
QuickGELU, layer scale, no ln_pre, average pooling with the final LayerNorm after it, squash/bilinear
preprocessing with its own mean/std, saved as open_clip_pytorch_model.bin. Every tensor is perturbed after
open_clip's init so that a misplaced bias, LayerNorm or scale changes the result.
"""

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from safetensors.torch import save_file

OUT = Path(__file__).parent / "open_clip"
CONTEXT = 16
CAPTIONS = ["a red square on a white background", "A photo of a cat.",
            "Hello &amp; World\u2019s caf\u00e9 \u2014 \u201cquoted\u201d",
            "the man is sitting in the room with the dog and the tree " * 2, "",
            "\u201cQ\u201d &amp; \u2014 \u00e9\u2019s"]
# 30x52 resizes to 32x55: a crop offset of 11.5, where round-half-even (torchvision) and floor differ.
IMAGES = {"noise_48x32.png": (48, 32), "noise_30x52.png": (30, 52), "noise_33x33.png": (33, 33)}
VARIANTS = {
    "standard": ({"quick_gelu": False}, {}, {}, "open_clip_model.safetensors"),
    "variant": ({"quick_gelu": True, "custom_text": True},
                {"ls_init_value": 0.5, "no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True},
                {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear",
                 "resize_mode": "squash"},
                "open_clip_pytorch_model.bin"),
}


def write_vocab(path: Path, merges: int = 60) -> None:
    """The first `merges` merges of open_clip's vocabulary (a self-consistent prefix), no trailing newline."""
    with gzip.open(open_clip.tokenizer.default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    with gzip.open(path, "wb") as f:
        f.write("\n".join(lines[: merges + 1]).encode("utf-8"))


def write_images() -> list[Image.Image]:
    images = []
    for i, (name, (w, h)) in enumerate(IMAGES.items()):
        rng = np.random.RandomState(i)
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(OUT / name)
        images.append(Image.open(OUT / name))
    return images


def build(name, top, vision_extra, preprocess_cfg, weights_name, vocab_size, tokenizer, images, golden, seed):
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = {"embed_dim": 8, **top,
                 "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 16, "layers": 2, "head_width": 8,
                                **vision_extra},
                 "text_cfg": {"context_length": CONTEXT, "vocab_size": vocab_size, "width": 16, "heads": 2,
                              "layers": 2, **({"ls_init_value": 0.5} if "ls_init_value" in vision_extra else {})}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                              "preprocess_cfg": preprocess_cfg}, indent=1))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = model.state_dict()
    if weights_name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, folder / weights_name)
    else:
        torch.save(state, folder / weights_name)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    pixels = torch.stack([preprocess(img) for img in images])
    ids = tokenizer(CAPTIONS)
    with torch.no_grad():
        golden[f"{name}.pixels"] = pixels
        golden[f"{name}.image_emb"] = model.encode_image(pixels, normalize=True)
        golden[f"{name}.text_emb"] = model.encode_text(ids, normalize=True)
    golden["ids"] = ids


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    write_vocab(OUT / "bpe_tiny.txt.gz")
    tokenizer = SimpleTokenizer(str(OUT / "bpe_tiny.txt.gz"), context_length=CONTEXT)
    images = write_images()
    golden = {}
    for seed, (name, (top, vision, pre, weights)) in enumerate(VARIANTS.items()):
        build(name, top, vision, pre, weights, tokenizer.vocab_size, tokenizer, images, golden, seed)
    shutil.copy(OUT / "bpe_tiny.txt.gz", OUT / "standard" / "bpe_simple_vocab_16e6.txt.gz")
    save_file({k: v.contiguous() for k, v in golden.items()}, OUT / "golden.safetensors")
    (OUT / "golden.json").write_text(json.dumps({"captions": CAPTIONS, "images": list(IMAGES),
                                                 "open_clip": open_clip.__version__, "torch": torch.__version__},
                                                indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
