"""The compressed-tensors format: bit-identical to the compressed-tensors package, exact round trips."""

from __future__ import annotations

import pytest
import torch

from llavakit.quant import QuantConfig, formats

CASES = [QuantConfig("w8a16"), QuantConfig("w4a16"), QuantConfig("w4a16", 32), QuantConfig("w8a16", 64),
         QuantConfig("w4a16", -1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 256, generator=g).to(dtype)
    w[5] = 0  # an all-zero row: its scale falls back to eps
    w[7, :128] *= 100  # an outlier group
    return w


def _ct_scheme(cfg: QuantConfig):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=cfg.bits, type="int", symmetric=True, group_size=cfg.group_size,
                            strategy="group" if cfg.group_size else "channel")
    return QuantizationScheme(targets=["Linear"], weights=args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.method}-g{c.group_size}")
def test_quantize_and_dequantize_equal_compressed_tensors(cfg, dtype):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    w, scheme = _weight(dtype), _ct_scheme(cfg)
    groups = w.unflatten(-1, (-1, cfg.group_size)) if cfg.group_size else w.unsqueeze(1)
    scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)  # llm-compressor's RTN
    theirs = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                                   scheme)
    ours = formats.quantize_weight(w, cfg)
    assert sorted(ours) == sorted(theirs) == sorted(formats.SUFFIXES)  # symmetric: no zero point stored
    for name in formats.SUFFIXES:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name
    assert {k: tuple(v.shape) for k, v in ours.items()} == formats.packed_shapes(48, 256, cfg)
    dequantized = PackedQuantizationCompressor.decompress(theirs, scheme)["weight"]
    assert torch.equal(formats.dequantize_weight(ours, cfg), dequantized)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trips_every_value(bits):
    lo, hi = formats.qrange(bits)
    q = torch.arange(lo, hi + 1, dtype=torch.int8).repeat(3, 40)[:, : 8 * 37]  # every value in every position
    q = q[:, torch.randperm(q.shape[1])]
    packed = formats.pack_ints(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, q.shape[1] * bits // 32)
    assert torch.equal(formats.unpack_ints(packed, bits, q.shape[1]), q)


def test_pack_layout_is_little_endian_offset_binary():
    """Element i of a row sits at bits [4i, 4i + 4) of word i // 8, offset by 8 (so -8 -> 0, 7 -> 15)."""
    q = torch.tensor([[-8, 7, 0, 1, -1, 2, 3, -8]], dtype=torch.int8)
    word = sum((v + 8) << (4 * i) for i, v in enumerate(q[0].tolist()))
    assert formats.pack_ints(q, 4).item() == word - (1 << 32 if word >= 1 << 31 else 0)
    q8 = torch.tensor([[-128, 127, 0, 1]], dtype=torch.int8)
    assert formats.pack_ints(q8, 8).item() == (0 | 255 << 8 | 128 << 16 | 129 << 24) - (1 << 32)


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.method}-g{c.group_size}")
def test_rounding_maps_absmax_to_the_ends_and_errors_stay_within_half_a_step(cfg):
    w = _weight(torch.float32)
    t = formats.quantize_weight(w, cfg)
    q = formats.unpack_weight(t, cfg)
    qmin, qmax = formats.qrange(cfg.bits)
    assert q.min() == qmin and q.max() == qmax
    err = (formats.dequantize_weight(t, cfg) - w).abs()
    step = t["weight_scale"].repeat_interleave(cfg.group_size or 256, dim=1)
    assert (err <= step * 0.5001).all()  # the absmax itself lands exactly half a step away (7.5 -> 7)
    assert torch.equal(formats.dequantize_weight(t, cfg)[5], torch.zeros(256))  # the zero row stays zero


def test_group_size_must_divide_the_input_features():
    with pytest.raises(ValueError, match="group size 96 must divide"):
        formats.quantize_weight(torch.randn(4, 256), QuantConfig("w4a16", 96))


@pytest.mark.parametrize("cfg", CASES + [QuantConfig("w4a16", 64, lm_head=True)],
                         ids=lambda c: f"{c.method}-g{c.group_size}-{c.lm_head}")
def test_quantization_config_round_trips_and_is_valid_compressed_tensors(cfg):
    block = formats.quantization_config(cfg)
    assert block["quant_method"] == "compressed-tensors" and block["format"] == "pack-quantized"
    assert formats.config_from_quantization_config(block) == cfg
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(block)
    weights = parsed.config_groups["group_0"].weights
    assert (weights.num_bits, weights.group_size, weights.symmetric) == (cfg.bits, cfg.group_size, True)
    assert ("lm_head" in parsed.ignore) != cfg.lm_head


@pytest.mark.parametrize("change, message", [
    (lambda b: b.update(quant_method="gptq"), "quantized with 'gptq'"),
    (lambda b: b["config_groups"]["group_0"]["weights"].update(symmetric=False), "asymmetric"),
    (lambda b: b["config_groups"]["group_0"]["weights"].update(num_bits=3), "3-bit int"),
    (lambda b: b["config_groups"]["group_0"].update(input_activations={"num_bits": 8}), "quantized activations"),
    (lambda b: b["config_groups"]["group_0"]["weights"].update(actorder="group"), "act-order"),
    (lambda b: b.update(format="float-quantized") or b["config_groups"]["group_0"].update(format=None),
     "format 'float-quantized'"),
])
def test_unrunnable_schemes_are_refused_with_the_reason(change, message):
    block = formats.quantization_config(QuantConfig("w4a16"))
    change(block)
    with pytest.raises(ValueError, match=message):
        formats.config_from_quantization_config(block)


def test_config_checks_method_and_group_size():
    assert QuantConfig("w4a16").group_size == 128 and QuantConfig("w8a16").group_size is None
    assert QuantConfig.parse("W8A16") == QuantConfig("w8a16") and QuantConfig.parse(None) is None
    with pytest.raises(ValueError, match="choose one of: w8a16, w4a16"):
        QuantConfig("int3")
    with pytest.raises(ValueError, match="multiple of 8"):
        QuantConfig("w4a16", 12)
