"""`apply_tp(model, tp)`: one LLaVA split over the ranks of a tensor-parallel group (Megatron-style).

The language model is split, the vision tower and projector are replicated (each rank encodes the same images:
the tower is a few percent of a step, and replicating it needs no collective before the decoder):
- q/k/v, gate and up are column-parallel: each rank computes its heads / its slice of the MLP width. With
  fewer KV heads than ranks, each rank keeps the one KV head its query heads read.
- o and down are row-parallel: each rank multiplies its input slice, then one all-reduce sums the parts
  (the bias is added on rank 0 only, so it is summed once).
- The embedding and the LM head are vocabulary-parallel: rows split evenly after padding the vocabulary to a
  multiple of the world size (32064 or 64000 at 8 ranks); the embedding all-reduces its lookups, the LM head
  all-gathers its logits and drops the padding.
Layers are split by their `tp_style` tag whatever their type: float Linear, LoRALinear (lora_A / lora_B split with
the weight they adapt) and QuantLinear (packed weights and scales split with it: a row-parallel split must fall
on group and packing boundaries). Works on a meta model (each tensor gets a `weight_loader` that slices the full
checkpoint tensor, so a rank never holds more than one full tensor) and on a loaded one (tensors sliced now).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from llavakit.config import TextConfig
from llavakit.layers.embedding import Embedding
from llavakit.layers.linear import Linear
from llavakit.models.llama import unfuse_projections
from llavakit.parallel.group import TPGroup
from llavakit.quant.config import QuantConfig
from llavakit.quant.formats import SUFFIXES, packed_shapes
from llavakit.quant.linear import QuantLinear


class TPError(ValueError):
    """A model that cannot be split over this many ranks."""


def apply_tp(model: nn.Module, tp: TPGroup) -> nn.Module:
    """Split `model` in place for rank `tp.rank` of `tp.size`; returns it (tagged `model.tp`)."""
    if tp.size == 1:
        return model
    quant = next((m.cfg for m in model.modules() if isinstance(m, QuantLinear)), None)
    check_splittable(model.cfg.text, tp.size, quant)
    lm = model.language_model
    unfuse_projections(lm)
    t, n, r = model.cfg.text, tp.size, tp.rank
    h, hk, d = t.num_attention_heads, t.num_key_value_heads, t.head_dim
    q_heads = h // n
    kv_first, kv_heads = kv_heads_of_rank(h, hk, n, r)
    width = t.intermediate_size // n
    reduce = functools.partial(_all_reduce_output, tp=tp)
    for layer in lm.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _split(attn, "q_proj", 0, r * q_heads * d, q_heads * d, tp)
        _split(attn, "k_proj", 0, kv_first * d, kv_heads * d, tp)
        _split(attn, "v_proj", 0, kv_first * d, kv_heads * d, tp)
        _split(attn, "o_proj", 1, r * q_heads * d, q_heads * d, tp).register_forward_hook(reduce)
        attn.num_heads = attn.attn.num_heads = q_heads
        attn.num_kv_heads = attn.attn.num_kv_heads = kv_heads
        _split(mlp, "gate_proj", 0, r * width, width, tp)
        _split(mlp, "up_proj", 0, r * width, width, tp)
        _split(mlp, "down_proj", 1, r * width, width, tp).register_forward_hook(reduce)
    vocab = t.vocab_size
    rows = -(-vocab // n)  # per rank, the padded vocabulary split evenly
    tied = t.tie_word_embeddings and getattr(model.lm_head, "weight", None) is lm.embed_tokens.weight
    lm.embed_tokens = VocabParallelEmbedding(lm.embed_tokens, r * rows, rows, tp)
    if tied:
        model.lm_head.weight = lm.embed_tokens.weight
    else:
        _split(model, "lm_head", 0, r * rows, rows, tp)
    model.lm_head.register_forward_hook(functools.partial(_gather_logits, tp=tp, vocab=vocab))
    _check_all_split(model)
    model.tp = tp
    return model


def check_splittable(t: TextConfig, n: int, quant: QuantConfig | None = None) -> None:
    """Refuse a world size the text model's heads or MLP width (or, quantized, its groups) do not divide into
    (TPError, in words)."""
    h, hk = t.num_attention_heads, t.num_key_value_heads
    if h % n:
        raise TPError(f"the model has {h} attention heads, which do not split evenly over {n} ranks; "
                      f"use a tensor-parallel size that divides {h}")
    if hk % n and n % hk:
        raise TPError(f"the model has {hk} key/value heads: a tensor-parallel size must divide {hk} or be a "
                      f"multiple of it, not {n}")
    if t.intermediate_size % n:
        raise TPError(f"the MLP width {t.intermediate_size} does not split evenly over {n} ranks; "
                      "use a tensor-parallel size that divides it")
    if quant is not None:
        need = quant.group_size or 32 // quant.bits
        for name, width in (("attention output", t.num_attention_heads * t.head_dim),
                            ("MLP", t.intermediate_size)):
            if (width // n) % need:
                raise TPError(f"{quant.method} with {'group size' if quant.group_size else 'packing'} "
                              f"{need} cannot split the {name} width {width} over {n} ranks ({width // n} each is "
                              f"not a multiple of {need}); use a smaller tensor-parallel size or another group size")


def kv_heads_of_rank(h: int, hk: int, n: int, rank: int) -> tuple[int, int]:
    """(first KV head, KV heads) rank `rank` keeps: an even share, or with fewer KV heads than ranks the one
    head its query heads use (the head is then replicated on n / hk ranks)."""
    if hk >= n:
        return rank * (hk // n), hk // n
    return (rank * (h // n)) // (h // hk), 1


class VocabParallelEmbedding(Embedding):
    """Rows [start, start + rows) of the (padded) vocabulary; a lookup sums every rank's part."""

    def __init__(self, full: Embedding, start: int, rows: int, tp: TPGroup):
        with torch.device("meta"):
            super().__init__(rows, full.embedding_dim)
        self.start, self.vocab, self.tp = start, full.num_embeddings, tp
        self.weight = _shard_param(full.weight, 0, start, rows, "split")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0)
        return self.tp.all_reduce(out)


def _all_reduce_output(module, inputs, output, tp: TPGroup):
    return tp.all_reduce(output)


def _gather_logits(module, inputs, output, tp: TPGroup, vocab: int):
    return tp.all_gather_last(output)[..., :vocab]


def _split(parent: nn.Module, name: str, dim: int, start: int, size: int, tp: TPGroup) -> nn.Module:
    """Keep [start, start + size) of `parent.name` along `dim` (0: outputs, column-parallel; 1: inputs,
    row-parallel) in every tensor of the layer; returns the layer."""
    layer = getattr(parent, name)
    if not isinstance(layer, (Linear, QuantLinear)):
        raise TPError(f"{name} is a {type(layer).__name__}, which tensor parallelism cannot split")
    layer.tp_full_shape = (layer.out_features, layer.in_features)
    layer.tp_split = (dim, start, size)
    if isinstance(layer, QuantLinear):
        for suffix in SUFFIXES:
            setattr(layer, suffix, _shard_quantized(layer, suffix))
        layer.repacked.clear()  # the whole layer's GPU copy, if a forward made one: freed now, not at the next call
    else:
        layer.weight = _shard_param(layer.weight, dim, start, size, "split")
        for lora, lora_dim in (("lora_A", 1), ("lora_B", 0)):  # A (r, in) splits with inputs, B (out, r) outputs
            if lora_dim == dim and hasattr(layer, lora):
                setattr(layer, lora, _shard_param(getattr(layer, lora), dim, start, size, "split"))
    if layer.bias is not None:
        layer.bias = (_shard_param(layer.bias, 0, start, size, "split") if dim == 0 else
                      _shard_param(layer.bias, 0, 0, layer.bias.shape[0], "rank0" if tp.rank == 0 else "zero"))
    if dim == 0:
        layer.out_features = size
    else:
        layer.in_features = size
    return layer


def quantized_part(layer: QuantLinear, suffix: str, whole: torch.Tensor) -> torch.Tensor:
    """This rank's part of one packed tensor (`suffix`: weight_packed, weight_scale, weight_shape) of a split
    QuantLinear, from the whole layer's tensor: packed words and group scales split with their inputs or
    outputs; a per-channel scale stays whole under a row split."""
    dim, start, size = layer.tp_split
    out_full, in_full = layer.tp_full_shape
    cfg = layer.cfg
    if suffix == "weight_shape":
        return torch.tensor((size, in_full) if dim == 0 else (out_full, size), dtype=torch.int64)
    expected = packed_shapes(out_full, in_full, cfg)[suffix]
    if tuple(whole.shape) != expected:
        raise ValueError(f"expected shape {expected}, checkpoint has {tuple(whole.shape)}")
    if dim == 0:
        return _take(whole, 0, start, size).contiguous()
    unit = 32 // cfg.bits if suffix == "weight_packed" else cfg.group_size
    if unit is None:  # one scale per output channel
        return whole
    assert start % unit == 0 and size % unit == 0, (suffix, start, size, unit)
    return _take(whole, 1, start // unit, size // unit).contiguous()


def _shard_quantized(layer: QuantLinear, suffix: str) -> torch.Tensor:
    """A split layer's packed tensor: sliced now, or (meta) a tensor of its shape that slices as it loads."""
    current = getattr(layer, suffix)
    if not current.is_meta:
        return quantized_part(layer, suffix, current).to(current.device)
    dim, start, size = layer.tp_split
    out_full, in_full = layer.tp_full_shape
    shapes = packed_shapes(size, in_full, layer.cfg) if dim == 0 else packed_shapes(out_full, size, layer.cfg)
    shape = current.shape if suffix == "weight_scale" and dim == 1 and not layer.cfg.group_size else shapes[suffix]
    new = torch.empty(shape, dtype=current.dtype, device="meta")
    new.weight_loader = lambda param, tensor: quantized_part(layer, suffix, tensor)
    return new


def _take(t: torch.Tensor, dim: int, start: int, size: int) -> torch.Tensor:
    """t's [start, start + size) along dim, zero-padded past its end (the padded vocabulary's rows)."""
    have = max(0, min(size, t.shape[dim] - start))
    part = t.narrow(dim, start, have)
    if have == size:
        return part
    pad_shape = list(t.shape)
    pad_shape[dim] = size - have
    return torch.cat([part, torch.zeros(pad_shape, dtype=t.dtype, device=t.device)], dim=dim)


def _slicer(full_shape: tuple[int, ...], dim: int, start: int, size: int, mode: str):
    """weight_loader(param, full tensor) -> this rank's part, checking the full tensor's shape first."""
    def load(param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        if tuple(tensor.shape) != full_shape:
            raise ValueError(f"expected shape {full_shape}, checkpoint has {tuple(tensor.shape)}")
        if mode == "rank0":
            return tensor
        if mode == "zero":
            return torch.zeros_like(tensor)
        return _take(tensor, dim, start, size).contiguous()
    return load


def _shard_param(p: nn.Parameter, dim: int, start: int, size: int, mode: str) -> nn.Parameter:
    loader = _slicer(tuple(p.shape), dim, start, size, mode)
    if p.is_meta:
        shape = list(p.shape)
        shape[dim] = size if mode == "split" else shape[dim]
        new = nn.Parameter(torch.empty(shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)
    else:
        with torch.no_grad():
            new = nn.Parameter(loader(p, p.detach()).clone(), requires_grad=p.requires_grad)
    new.weight_loader = loader
    return new


def _check_all_split(model: nn.Module) -> None:
    """Every column- or row-tagged layer of the language model was split (a new layer type would otherwise
    run unsplit and give wrong sums)."""
    for name, m in model.language_model.named_modules():
        if getattr(m, "tp_style", "replicated") != "replicated" and not hasattr(m, "tp_split"):
            raise TPError(f"{name} ({type(m).__name__}) is tagged {m.tp_style}-parallel but was not split")
