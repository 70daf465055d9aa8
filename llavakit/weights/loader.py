"""Build a model on the meta device and fill it from checkpoint files, tensor by tensor.

No parameter is ever allocated twice: the model starts without storage, and each checkpoint tensor
(memory-mapped from its file) is converted to the target dtype/device and becomes the parameter.
A parameter may carry a `weight_loader(param, tensor) -> tensor` (tensor parallelism slices there);
the default only checks the shape. With a QuantConfig the language model's Linear layers are built empty
and quantized (weights.quantized) as each float weight is read; a compressed-tensors checkpoint's packed
tensors fill them by name, with no flag.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from llavakit.checkpoint_config import vision_tower_missing_message
from llavakit.config import LlavaConfig
from llavakit.layers.rotary import RotaryEmbedding
from llavakit.models.llava import LlavaForConditionalGeneration
from llavakit.parallel.group import TPGroup
from llavakit.parallel.tp import apply_tp
from llavakit.quant.config import QuantConfig
from llavakit.quant.quantize import quantize_skeleton
from llavakit.weights.files import WeightsError, find_weight_files, iter_tensors
from llavakit.weights.name_maps import LAYOUTS, detect_layout, is_unused, map_name
from llavakit.weights.quantized import (
    buffer_names,
    checkpoint_quantization,
    choose_quantization,
    fill_quantized,
    quantized_owner,
)

_LIST_LIMIT = 12


def default_weight_loader(param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """Whole-tensor load: the shapes must agree."""
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"expected shape {tuple(param.shape)}, checkpoint has {tuple(tensor.shape)}")
    return tensor


def load_llava(cfg: LlavaConfig, directory: Path, dtype: torch.dtype, device: torch.device,
               quantization: QuantConfig | None = None, tp: TPGroup | None = None) -> LlavaForConditionalGeneration:
    """The LLaVA model of `cfg` with the weights in `directory` (and a separate CLIP tower if needed),
    quantized as it loads when `quantization` is given or the checkpoint is a compressed-tensors one; with
    `tp`, this rank's shard only (parallel.tp)."""
    sources = [(directory, cfg.layout)]
    if cfg.vision_tower_dir:
        sources.append((Path(cfg.vision_tower_dir), "clip"))
    quantization = choose_quantization(quantization, checkpoint_quantization(directory))
    return load_parts(cfg, sources, dtype, device, quantization=quantization, tp=tp).eval()


def load_parts(cfg: LlavaConfig, sources: list[tuple[Path, str]], dtype: torch.dtype, device: torch.device,
               init_missing: tuple[str, ...] = (), loaders: dict | None = None,
               quantization: QuantConfig | None = None, tp: TPGroup | None = None) -> LlavaForConditionalGeneration:
    """Build `cfg`'s model on the meta device and fill it from (directory, layout) sources in order (the
    first source to supply a tensor wins). Parameters whose names start with `init_missing` may be
    absent: they get their module's fresh initialization. `loaders` maps parameter names to
    `weight_loader(param, tensor) -> tensor` functions (e.g. to resize an embedding). `quantization`:
    quantize the language model's Linear layers as their weights are read. `tp`: keep this rank's shard of
    each tensor as it is read (parallel.tp)."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
        if quantization is not None:
            quantize_skeleton(model, quantization)
    if tp is not None:
        if loaders:
            raise ValueError("tensor parallelism does not combine with custom weight loaders (training)")
        apply_tp(model, tp)
    for name, fn in (loaders or {}).items():
        model.get_parameter(name).weight_loader = fn
    opened = [_source(d, layout) for d, layout in sources]
    if not any(_maps_to_tower(entries, rules) for _, entries, rules in opened):
        raise WeightsError(vision_tower_missing_message(cfg.vision_tower_name))
    loaded = _fill(model, opened, cfg, dtype, device)
    if cfg.text.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):  # (a quantized head is its own)
        model.lm_head.weight = model.language_model.embed_tokens.weight  # the embedding was replaced: re-point
    _init_fresh(model, loaded, init_missing, dtype, device)
    _check_complete(model, loaded | _fresh_names(model, loaded, init_missing), cfg)
    _materialize_buffers(model, device)
    return model


def _fresh_names(model: nn.Module, loaded: set[str], prefixes: tuple[str, ...]) -> set[str]:
    return {n for n, _ in model.named_parameters() if n not in loaded and prefixes and n.startswith(prefixes)}


def _init_fresh(model: nn.Module, loaded: set[str], prefixes: tuple[str, ...], dtype, device) -> None:
    """Give the parameters no checkpoint supplied their module's own initialization."""
    owners = {n.rpartition(".")[0] for n in _fresh_names(model, loaded, prefixes)}
    for owner in sorted(owners):
        module = model.get_submodule(owner) if owner else model
        if owner == "":  # a bare parameter on the model itself (image_newline): LLaVA-NeXT's init
            model.image_newline = nn.Parameter(torch.randn(model.cfg.text.hidden_size, device=device) /
                                               model.cfg.text.hidden_size ** 0.5, requires_grad=False)
            continue
        module.to_empty(device=device, recurse=False)
        module.reset_parameters()
        module.to(dtype)


def _source(directory: Path, layout: str):
    """(directory, [(name, getter)], name rules) for one checkpoint directory."""
    entries = list(iter_tensors(find_weight_files(directory)))
    if layout in ("llava-hf", "original"):  # a LLaVA checkpoint: its tensor names tell transformers-5 apart
        layout = detect_layout([n for n, _ in entries], layout)
    return directory, entries, LAYOUTS[layout]


def _maps_to_tower(entries, rules) -> bool:
    for name, _ in entries:
        try:
            if (map_name(name, rules) or "").startswith("vision_tower."):
                return True
        except KeyError:
            pass
    return False


def _fill(model: nn.Module, sources, cfg: LlavaConfig, dtype, device) -> set[str]:
    params = dict(model.named_parameters())
    buffers = set(buffer_names(model))
    built = len(model.vision_tower.encoder.layers)
    loaded: set[str] = set()
    unexpected: list[str] = []
    for directory, entries, rules in sources:
        for name, get in tqdm(entries, desc=f"loading {directory.name}", unit="tensor", disable=None, leave=False):
            try:
                target = map_name(name, rules)
            except KeyError:
                unexpected.append(name)
                continue
            if target is None or target in loaded or is_unused(target, built):
                continue
            quantized = quantized_owner(model, target) if target not in params else None
            if quantized is not None:  # a float weight of a layer quantized on load
                owner = target.rpartition(".")[0]
                loaded.update(f"{owner}.{n}" for n in _set_quantized(quantized, target, get(), dtype, device))
            elif target in params or target in buffers:
                _set_param(model, target, params.get(target), get(), dtype, device)
            elif not (target == "lm_head.weight" and cfg.text.tie_word_embeddings):
                unexpected.append(name)
                continue
            loaded.add(target)
    if unexpected:
        raise WeightsError(f"checkpoint has {len(unexpected)} tensors this model does not have: "
                           f"{_short_list(unexpected)}; is config.json the one that belongs to these weights?")
    return loaded


def _set_param(model: nn.Module, target: str, param: nn.Parameter | None, tensor: torch.Tensor, dtype,
               device) -> None:
    """Set a parameter, or (param None) a quantized layer's packed buffer, from a checkpoint tensor."""
    module_name, _, attr = target.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    current = param if param is not None else getattr(module, attr)
    loader = getattr(current, "weight_loader", default_weight_loader)
    try:
        tensor = loader(current, tensor)
    except ValueError as e:
        raise WeightsError(f"tensor {target}: {e}; the weights do not match config.json") from None
    value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    setattr(module, attr, value if param is None else nn.Parameter(value, requires_grad=False))


def _set_quantized(module, target: str, tensor: torch.Tensor, dtype, device) -> list[str]:
    try:
        return fill_quantized(module, tensor, dtype, device)
    except ValueError as e:
        raise WeightsError(f"tensor {target}: {e}; the weights do not match config.json") from None


def _check_complete(model: nn.Module, loaded: set[str], cfg: LlavaConfig) -> None:
    missing = [n for n in [n for n, _ in model.named_parameters()] + buffer_names(model) if n not in loaded]
    if not missing:
        return
    if cfg.layout == "original" and all(n.startswith("vision_tower.") for n in missing):
        raise WeightsError(vision_tower_missing_message(cfg.vision_tower_name))
    raise WeightsError(f"checkpoint lacks {len(missing)} tensors the model needs (llavakit names): "
                       f"{_short_list(missing)}; the download may be incomplete "
                       "or config.json may describe another model")


def _materialize_buffers(model: LlavaForConditionalGeneration, device) -> None:
    """Computed buffers were built on the meta device; compute them on the target device."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_buffers(device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not leftover, f"tensors left on the meta device: {leftover}"


def _short_list(names: list[str]) -> str:
    more = f" (+{len(names) - _LIST_LIMIT} more)" if len(names) > _LIST_LIMIT else ""
    return ", ".join(names[:_LIST_LIMIT]) + more


def random_llava(cfg: LlavaConfig, dtype: torch.dtype, device: torch.device, seed: int = 0,
                 std: float = 0.02, quantization: QuantConfig | None = None,
                 tp: TPGroup | None = None) -> LlavaForConditionalGeneration:
    """A model with random weights and no checkpoint (load_format="dummy"): built on the meta device,
    allocated once on `device` in `dtype` (never in float32 first), filled with N(0, std) weights, zero biases
    and unit norms. With `quantization`, each quantized layer's weight is drawn in float and quantized at
    once (the same weights as quantizing the float model). With `tp`, each tensor is drawn whole and this
    rank's shard kept (the same model as without). A model that cannot fit in the memory `device` has free is
    refused before allocating."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg).to(dtype)
        shapes = [(name, p.shape) for name, p in model.named_parameters()]  # the float model's drawing order
        if quantization is not None:
            quantize_skeleton(model, quantization)
    if tp is not None:
        apply_tp(model, tp)
    shards = {name: p.weight_loader for name, p in model.named_parameters() if hasattr(p, "weight_loader")}
    _check_fits(model, dtype, device, cfg.name_or_path)
    model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, shape in shapes:
            quantized = quantized_owner(model, name) if name.endswith("weight") else None
            whole = quantized or name in shards
            p = torch.empty(shape, dtype=dtype, device=device) if whole else model.get_parameter(name)
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1 and ("norm" in name or "layrnorm" in name):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
            if quantized:
                fill_quantized(quantized, p, dtype, device)
            elif name in shards:
                target = model.get_parameter(name)
                target.copy_(shards[name](target, p))
    if cfg.text.tie_word_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.language_model.embed_tokens.weight
    _materialize_buffers(model, device)
    return model.to(dtype).eval()


def _check_fits(model: nn.Module, dtype: torch.dtype, device: torch.device, name: str) -> None:
    """Refuse weights larger than the free memory of `device` (CUDA: free device memory; CPU: MemAvailable)."""
    need = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    free = free_memory(device)
    if free is not None and need > free:
        half = " pass --dtype bfloat16 (half the memory) or" if dtype == torch.float32 else ""
        raise ValueError(f"{name} in {str(dtype).removeprefix('torch.')} needs {need / 2**30:.1f} GiB of weights but "
                          f"{device} has {free / 2**30:.1f} GiB free;{half} use a smaller preset (bench-small)")


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device`, or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
