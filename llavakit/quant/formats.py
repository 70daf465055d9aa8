"""The compressed-tensors "pack-quantized" format, as vLLM, SGLang, llm-compressor and transformers read it.

Pure tensor functions, bit-identical to the `compressed-tensors` package (tests compare against it):
- A weight (out, in) becomes `weight_packed` int32 (out, ceil(in * bits / 32)): each value q in [-2^(b-1),
  2^(b-1) - 1] is stored offset to unsigned (q + 2^(b-1)), packed densely along the input dimension, element i of
  a row at bit i * bits of the row's bit string, little-endian (8 int4 or 4 int8 values per int32).
- `weight_scale` (out, 1) per channel or (out, in / group_size) per group, in the weight's float dtype.
- `weight_shape` int64 (2,): the unpacked shape. Symmetric schemes store no zero point.

Scales and rounding follow compressed-tensors' round-to-nearest: scale = absmax / ((qmax - qmin) / 2), i.e.
absmax / 127.5 for int8 and absmax / 7.5 for int4 (a zero scale becomes the dtype's eps); q = round(clamp(w /
scale, qmin, qmax)) with round-half-to-even, computed in the weight's dtype. So +absmax maps to qmax and -absmax
to qmin.
"""

from __future__ import annotations

import math
import sys

import torch

from llavakit.quant.config import QuantConfig

SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")
FORMAT = "pack-quantized"


def qrange(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of a signed `bits`-bit integer."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def pack_ints(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 values (rows, cols) of `bits` (4 or 8) bits -> int32 (rows, ceil(cols * bits / 32))."""
    assert q.dtype == torch.int8 and q.dim() == 2 and bits in (4, 8), (q.dtype, q.shape, bits)
    per_word = 32 // bits
    rows, cols = q.shape
    u = q.to(torch.int32) + (1 << (bits - 1))
    u = torch.nn.functional.pad(u, (0, -cols % per_word)).view(rows, -1, per_word)
    packed = torch.zeros(u.shape[:2], dtype=torch.int32, device=q.device)
    for k in range(per_word):  # int32 shifts wrap like the reference's int32 adds
        packed |= u[..., k] << (bits * k)
    return packed


def unpack_ints(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack_ints`: int32 (rows, words) -> int8 (rows, cols). Reads the words as bytes (int4 and int8
    values never straddle a byte), which is several times faster than shifting whole words."""
    assert packed.dtype == torch.int32 and bits in (4, 8), (packed.dtype, bits)
    rows, words = packed.shape
    u = packed.contiguous().view(torch.uint8).view(rows, words, 4)
    if sys.byteorder == "big":  # a word's bytes in memory order are most significant first there
        u = u.flip(-1)
    if bits == 4:  # low nibble first
        return torch.stack((u & 0xF, u >> 4), dim=-1).reshape(rows, -1)[:, :cols].view(torch.int8) - 8
    return (u.reshape(rows, -1)[:, :cols] ^ 0x80).view(torch.int8)  # offset binary -> two's complement


def _grouped(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """(out, in) -> (out, groups, group) with one group per row when quantizing per channel."""
    out, n = w.shape
    g = cfg.group_size or n
    if n % g:
        raise ValueError(f"quantization group size {g} must divide the layer's {n} input features; "
                         f"choose a group size that divides {n}")
    return w.view(out, n // g, g)


def compute_scale(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Symmetric round-to-nearest scales of a float weight (out, in) -> (out, groups), in w's dtype."""
    wg = _grouped(w, cfg)
    lo = torch.clamp(wg.amin(dim=-1), max=0)
    hi = torch.clamp(wg.amax(dim=-1), min=0)
    qmin, qmax = qrange(cfg.bits)
    scale = torch.max(lo.abs(), hi.abs()) / (torch.tensor(float(qmax - qmin)).to(w.dtype) / 2)
    return torch.where(scale == 0, torch.tensor(torch.finfo(w.dtype).eps, dtype=w.dtype), scale)


def quantize_ints(w: torch.Tensor, scale: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Float weight (out, in) and scales (out, groups) -> int8 values (out, in)."""
    qmin, qmax = qrange(cfg.bits)
    q = torch.clamp(_grouped(w, cfg) / scale.unsqueeze(-1), qmin, qmax).round()
    return q.flatten(1).to(torch.int8)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
    """A float weight (out, in) -> its compressed-tensors tensors, keyed by suffix (see the module docstring)."""
    assert w.dim() == 2 and w.is_floating_point(), (w.shape, w.dtype)
    scale = compute_scale(w, cfg)
    q = quantize_ints(w, scale, cfg)
    return {"weight_packed": pack_ints(q, cfg.bits), "weight_scale": scale,
            "weight_shape": torch.tensor(w.shape, dtype=torch.int64)}


def packed_shapes(out_features: int, in_features: int, cfg: QuantConfig) -> dict[str, tuple[int, ...]]:
    """The shapes `quantize_weight` gives a weight (out, in)."""
    groups = in_features // cfg.group_size if cfg.group_size else 1
    return {"weight_packed": (out_features, math.ceil(in_features * cfg.bits / 32)),
            "weight_scale": (out_features, groups), "weight_shape": (2,)}


def unpack_weight(tensors: dict[str, torch.Tensor], cfg: QuantConfig) -> torch.Tensor:
    """The int8 values (out, in) of a packed weight."""
    in_features = int(tensors["weight_shape"][1])
    return unpack_ints(tensors["weight_packed"], cfg.bits, in_features)


@torch.no_grad()
def dequantize_weight(tensors: dict[str, torch.Tensor], cfg: QuantConfig, dtype: torch.dtype | None = None
                      ) -> torch.Tensor:
    """Packed tensors -> the float weight (out, in): q * scale in the scale's dtype, then cast to `dtype`."""
    w = dequantize_ints(unpack_weight(tensors, cfg), tensors["weight_scale"])
    return w if dtype is None else w.to(dtype)


def dequantize_ints(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int values q (out, in) and scales (out, groups) -> the float weight (out, in) in the scales' dtype."""
    out, n = q.shape
    return (q.view(out, scale.shape[1], -1).to(scale.dtype) * scale.unsqueeze(-1)).view(out, n)


# Module names kept in float, as llm-compressor's LLaVA examples write them (regexes over llava-hf names).
FLOAT_MODULES = ["re:.*vision_tower.*", "re:.*multi_modal_projector.*"]
LM_HEAD = "lm_head"


def quantization_config(cfg: QuantConfig) -> dict:
    """The config.json "quantization_config" block for a checkpoint quantized with `cfg`."""
    strategy = "group" if cfg.group_size else "channel"
    weights = {"num_bits": cfg.bits, "type": "int", "symmetric": True, "group_size": cfg.group_size,
               "strategy": strategy, "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
               "observer_kwargs": {}}
    group = {"targets": ["Linear"], "weights": weights, "input_activations": None, "output_activations": None,
             "format": FORMAT}
    ignore = FLOAT_MODULES + ([] if cfg.lm_head else [LM_HEAD])
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}


def config_from_quantization_config(block: dict) -> QuantConfig:
    """The QuantConfig of a compressed-tensors checkpoint's "quantization_config"; refuses schemes llavakit cannot
    run (activation quantization, asymmetric or float weights, act-order groups, other bit widths or formats)."""
    method = block.get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(f"this checkpoint is quantized with {method!r}; llavakit reads compressed-tensors "
                         "W8A16/W4A16 checkpoints (convert it with `llavakit convert` from a float checkpoint)")
    groups = list((block.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError(f"this compressed-tensors checkpoint has {len(groups)} quantization groups; llavakit reads "
                         "checkpoints with one weight-only W8A16 or W4A16 group")
    group = groups[0]
    w = group.get("weights") or {}
    fmt = group.get("format") or block.get("format")
    problems = [text for bad, text in [
        (fmt != FORMAT, f"format {fmt!r} (llavakit reads {FORMAT!r})"),
        (group.get("input_activations") or group.get("output_activations"), "quantized activations"),
        (w.get("type") != "int" or w.get("num_bits") not in (4, 8), f"{w.get('num_bits')}-bit {w.get('type')} weights"),
        (not w.get("symmetric", True), "asymmetric weights (zero points)"),
        (w.get("strategy") not in ("channel", "group"), f"{w.get('strategy')!r} weight strategy"),
        (w.get("actorder") == "group", "act-order groups (g_idx)")] if bad]
    if problems:
        raise ValueError(f"llavakit cannot run this compressed-tensors checkpoint: {'; '.join(problems)}; it runs "
                         "symmetric int8 (W8A16) or int4 (W4A16) weight-only, per channel or per group")
    group_size = w.get("group_size") if w.get("strategy") == "group" else -1
    ignore = block.get("ignore") or []
    lm_head = not any(name == LM_HEAD or name.endswith("." + LM_HEAD) or (name.startswith("re:") and "lm_head" in name)
                      for name in ignore)
    return QuantConfig("w8a16" if w["num_bits"] == 8 else "w4a16", group_size, lm_head)
