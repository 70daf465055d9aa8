"""Random-weight LLaVA checkpoints in the llava-hf hub layout, at benchmark sizes.

Tensor names and shapes come from a transformers model built on the meta device, so building never
holds the model in memory: tensors are drawn and written one safetensors shard at a time (peak memory
is one shard). The directory is complete (config, shards + index, preprocessor and tokenizer) and is
cached: it is rebuilt only when the preset's spec changes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from llavakit.assets import LLAMA_TOKENIZER_DIR as TOKENIZER_DIR

IMAGE_TOKEN_ID = 32000
VOCAB = 32064
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
MARKER = "bench_checkpoint.json"

# transformers-5 in-memory prefixes -> llava-hf hub prefixes (as tests/checkpoints.py writes them).
HUB_PREFIXES = (("model.language_model.", "language_model.model."),
                ("lm_head.", "language_model.lm_head."),
                ("model.vision_tower.", "vision_tower.vision_model."),
                ("model.multi_modal_projector.", "multi_modal_projector."))

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)


@dataclass(slots=True, frozen=True)
class CheckpointSpec:
    """What a benchmark checkpoint looks like: tower and decoder sizes, and how big each shard may be."""

    vision: dict
    text: dict
    shard_bytes: int = 1 << 30
    seed: int = 0
    dtype: str = "float16"  # the stored dtype: a torch dtype name


def _text(hidden: int, intermediate: int, layers: int, heads: int) -> dict:
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads)


PRESETS: dict[str, CheckpointSpec] = {
    "tiny": CheckpointSpec(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=56, patch_size=14, projection_dim=32),
                           text=_text(128, 256, 2, 4), shard_bytes=4 << 20),
    # CLIP ViT-L/14-336 tower + a TinyLlama-sized decoder: ~1.5 B parameters, ~3 GB in fp16.
    "small": CheckpointSpec(vision=CLIP_L_336, text=_text(2048, 5504, 22, 16)),
    # The real LLaVA-1.5-7B dimensions: ~7 B parameters, ~14 GB in fp16.
    "7b": CheckpointSpec(vision=CLIP_L_336, text=_text(4096, 11008, 32, 32), shard_bytes=4 << 30),
}


def transformers_config(spec: CheckpointSpec):
    """The transformers LlavaConfig for `spec` (spec.dtype, llama decoder, CLIP tower)."""
    from transformers import LlavaConfig

    text = dict(model_type="llama", vocab_size=VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5,
                bos_token_id=1, eos_token_id=2, pad_token_id=32001, tie_word_embeddings=False, **spec.text)
    vision = dict(model_type="clip_vision_model", **spec.vision)
    return LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN_ID, dtype=spec.dtype)


def hub_shapes(config) -> dict[str, tuple[int, ...]]:
    """Hub tensor name -> shape, read off a transformers model that holds no storage."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return {_hub_name(k): tuple(v.shape) for k, v in model.state_dict().items()}


def _hub_name(key: str) -> str:
    for src, dst in HUB_PREFIXES:
        if key.startswith(src):
            return dst + key[len(src):]
    raise KeyError(f"no hub name for transformers tensor {key}")


def plan_shards(shapes: dict[str, tuple[int, ...]], shard_bytes: int, itemsize: int = 2) -> list[list[str]]:
    """Names grouped into shards of at most `shard_bytes` of `itemsize`-byte elements (a bigger tensor
    gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_shards(shapes: dict[str, tuple[int, ...]], directory: Path, spec: CheckpointSpec,
                 log: Callable[[str], None]) -> int:
    """Random spec.dtype tensors, shard by shard, plus model.safetensors.index.json; returns the total bytes."""
    gen = torch.Generator().manual_seed(spec.seed)
    dtype = getattr(torch, spec.dtype)
    shards = plan_shards(shapes, spec.shard_bytes, dtype.itemsize)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        log(f"writing {file} ({len(names)} tensors)")
        part = {n: torch.randn(shapes[n], generator=gen, dtype=dtype).mul_(0.02) for n in names}
        save_file(part, directory / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def preprocessor_config(size: int) -> dict:
    """A llava-hf CLIPImageProcessor config for `size`-pixel tiles."""
    return dict(image_processor_type="CLIPImageProcessor", processor_class="LlavaProcessor",
                size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                image_mean=CLIP_MEAN, image_std=CLIP_STD, do_resize=True, do_center_crop=True,
                do_rescale=True, do_normalize=True, do_convert_rgb=True, resample=3, rescale_factor=1 / 255)


def save_tokenizer(directory: Path) -> None:
    """The llama tokenizer shipped in the package with the <image> (32000) and <pad> (32001) tokens llava-hf adds."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tok.add_tokens(["<image>", "<pad>"], special_tokens=True)
    tok.pad_token = "<pad>"
    tok.save_pretrained(directory)


def ensure_checkpoint(directory: Path, spec: CheckpointSpec, log: Callable[[str], None]) -> Path:
    """Build the checkpoint of `spec` in `directory` unless a complete one for the same spec is there."""
    marker = directory / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == asdict(spec):
        log(f"reusing checkpoint {directory}")
        return directory
    log(f"building checkpoint {directory}")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    config = transformers_config(spec)
    shapes = hub_shapes(config)
    total = write_shards(shapes, directory, spec, log)
    config.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(spec.vision["image_size"])))
    save_tokenizer(directory)
    marker.write_text(json.dumps(asdict(spec)))  # written last: its presence means the build finished
    log(f"built {len(shapes)} tensors, {total / 2**30:.2f} GiB")
    return directory


def weight_files(directory: Path) -> list[Path]:
    """The safetensors shards of a checkpoint directory."""
    return sorted(directory.glob("*.safetensors"))
