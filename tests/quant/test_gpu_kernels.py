"""The GPU paths of `quant_linear`: torch's `_weight_int8pack_mm` and tinygemm's `_weight_int4pack_mm` on weights
repacked once per layer, after which the layer keeps its stored weight on the host (one copy on the GPU). The
packing is the same for the CPU variants of these ops, so it is checked exactly here on the CPU, and so is the
release (`repacking_cpu` runs the GPU logic on the CPU); the CUDA tests run the real kernels and skip without CUDA."""

from __future__ import annotations

import weakref

import pytest
import torch

from llavakit.layers.linear import linear
from llavakit.quant import QuantConfig, kernels
from llavakit.quant.formats import unpack_ints
from llavakit.quant.linear import QuantLinear
from llavakit.train.lora import QLoRALinear

IN, OUT = 256, 96
INT4 = [QuantConfig("w4a16"), QuantConfig("w4a16", 32), QuantConfig("w4a16", 64), QuantConfig("w4a16", -1)]
CASES = [QuantConfig("w8a16"), *INT4]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _layer(cfg, dtype=torch.float32, bias=False, device="cpu", out=OUT, seed=0) -> QuantLinear:
    torch.manual_seed(seed)
    q = QuantLinear.from_linear(linear(IN, out, bias=bias).to(device, dtype), cfg)
    if bias:
        with torch.no_grad():
            q.bias.normal_()
    return q


def _name(cfg):
    return f"{cfg.method}-g{cfg.group_size}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", CASES, ids=_name)
def test_the_packing_gives_the_reference_through_the_cpu_ops(cfg, dtype):
    q = _layer(cfg, dtype, bias=True)
    p = kernels.prepare(q.weight_packed, q.weight_scale, cfg, dtype)
    assert p is not None and p.kind == ("int8" if cfg.bits == 8 else "int4")
    x = torch.randn(2, 3, IN).to(dtype)
    with torch.no_grad():
        fast = kernels.run_prepared(x, p, q.bias)
        ref = kernels.reference(x, q.weight_packed, q.weight_scale, q.bias, cfg)
    assert fast.dtype == dtype and fast.shape == (2, 3, OUT)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fast, ref, rtol=tol, atol=tol)


def test_tinygemm_scales_repeat_ours_with_zero_zeros():
    scale = torch.arange(1, 7, dtype=torch.float32).view(3, 2)  # (out 3, groups 2) of group 256
    sz = kernels.tinygemm_scales_and_zeros(scale, 256, 128, torch.bfloat16)
    assert sz.shape == (4, 3, 2) and sz.dtype == torch.bfloat16
    assert torch.equal(sz[..., 1], torch.zeros(4, 3, dtype=torch.bfloat16))
    assert sz[..., 0].T.tolist() == [[1, 1, 2, 2], [3, 3, 4, 4], [5, 5, 6, 6]]
    assert kernels.tinygemm_group(QuantConfig("w4a16", -1), 4096) == 256
    assert kernels.tinygemm_group(QuantConfig("w4a16", 96), 4096) == 32
    assert kernels.tinygemm_group(QuantConfig("w4a16", 40), 4096) is None


def test_cuda_packing_input_follows_the_torch_version():
    q = torch.tensor([[-8, 7, 0, -1], [3, -4, 5, 6]], dtype=torch.int8)
    old = kernels.tinygemm_input(q, "cuda", (2, 4))
    assert old.dtype == torch.int32 and old.tolist() == [[0, 15, 8, 7], [11, 4, 13, 14]]
    new = kernels.tinygemm_input(q, "cuda", (2, 11))
    assert new.dtype == torch.uint8 and new.tolist() == [[0x0F, 0x87], [0xB4, 0xDE]]  # even element high
    assert torch.equal(kernels.tinygemm_input(q, "cpu", (2, 13)), old)


def test_prepared_int8_weight_is_the_format_values():
    cfg = QuantConfig("w8a16")
    q = _layer(cfg)
    p = kernels.prepare(q.weight_packed, q.weight_scale, cfg, torch.float16)
    assert torch.equal(p.weight, unpack_ints(q.weight_packed, 8, IN)) and p.weight.dtype == torch.int8
    assert p.scales.dtype == torch.float16 and p.scales.shape == (OUT,)


@pytest.mark.parametrize("cfg, dtype", [(QuantConfig("w8a16", 64), torch.float32),  # grouped int8: no op
                                        (QuantConfig("w4a16", 40), torch.bfloat16)])  # no tinygemm group
def test_layouts_the_ops_cannot_take_are_left_to_the_reference(cfg, dtype):
    torch.manual_seed(0)
    q = QuantLinear.from_linear(linear(320, OUT), cfg)
    assert kernels.prepare_kind(q.weight_packed, cfg, dtype) is None
    assert kernels.prepare(q.weight_packed, q.weight_scale, cfg, dtype) is None


def test_the_cache_is_not_used_on_cpu():
    cfg = QuantConfig("w4a16")
    q = _layer(cfg)
    with torch.no_grad():
        q(torch.randn(1, IN))
    assert q.repacked == {}


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [1, 16, kernels.CUDA_MAX_ROWS])
@pytest.mark.parametrize("cfg", CASES, ids=_name)
def test_cuda_kernels_equal_the_reference(cfg, rows, dtype):
    q = _layer(cfg, dtype, bias=True, device="cuda")
    x = torch.randn(rows, IN, device="cuda", dtype=dtype)
    with torch.no_grad():
        ref = kernels.reference(x, q.weight_packed, q.weight_scale, q.bias, cfg)
        fast = q(x)
    kind = q.repacked["cuda"][-1].kind
    assert kind == ("int8" if cfg.bits == 8 else "int4")
    torch.testing.assert_close(fast, ref, rtol=3e-2, atol=3e-2)


@needs_cuda
def test_cuda_repacks_once_and_again_after_a_new_weight():
    cfg = QuantConfig("w4a16")
    q = _layer(cfg, torch.bfloat16, device="cuda")
    x = torch.randn(1, IN, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        q(x)
        first = q.repacked["cuda"][-1]
        q(x)
        assert q.repacked["cuda"][-1] is first
        q.set_weight(torch.randn(OUT, IN, device="cuda", dtype=torch.bfloat16))
        y = q(x)
    assert q.repacked["cuda"][-1] is not first and q.weight_packed.device == kernels.HOST
    torch.testing.assert_close(y, kernels.reference(x, q.weight_packed.cuda(), q.weight_scale, None, cfg), rtol=3e-2,
                               atol=3e-2)


@needs_cuda
def test_cuda_prefill_and_training_take_the_reference():
    cfg = QuantConfig("w8a16")
    q = _layer(cfg, torch.bfloat16, device="cuda")
    with torch.no_grad():
        q(torch.randn(kernels.CUDA_MAX_ROWS + 1, IN, device="cuda", dtype=torch.bfloat16))
    assert q.repacked == {}
    x = torch.randn(1, IN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q(x).sum().backward()
    assert q.repacked == {} and x.grad is not None


def test_an_op_that_fails_on_its_first_call_leaves_the_reference():
    cfg = QuantConfig("w8a16")
    q = _layer(cfg)
    p = kernels.prepare(q.weight_packed, q.weight_scale, cfg, torch.float32)
    x = torch.randn(2, IN)
    assert kernels._probed(x, p) is p
    broken = kernels.Prepared(p.kind, p.weight[:, :IN // 2], p.scales, 0)  # wrong inner size: the op raises
    assert kernels._probed(x, broken) is None
    assert kernels._probed(x, None) is None


@pytest.fixture
def repacking_cpu(monkeypatch):
    """The GPU logic on the CPU: products repack for torch's ops (their CPU variants), our CPU kernels stay out."""
    monkeypatch.setattr(kernels, "repacks_on", lambda device: True)
    monkeypatch.setattr(kernels, "_cpu_library", lambda: None)


RELEASED = [(QuantConfig("w8a16"), torch.float32), (QuantConfig("w8a16"), torch.bfloat16),
            (QuantConfig("w4a16", 32), torch.bfloat16), (QuantConfig("w4a16", -1), torch.float32)]


def _case(case):
    return f"{_name(case[0])}-{str(case[1]).split('.')[-1]}" if isinstance(case, tuple) else None


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().clone() for name, t in module.state_dict().items()}


def _assert_same(state: dict, expected: dict) -> None:
    assert state.keys() == expected.keys()
    for name, t in expected.items():
        assert state[name].dtype == t.dtype and torch.equal(state[name], t), name


def _tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}


@pytest.mark.parametrize("cfg, dtype", RELEASED, ids=[_case(c) for c in RELEASED])
def test_the_first_repack_frees_the_stored_copy_and_keeps_the_bytes(repacking_cpu, cfg, dtype):
    q = _layer(cfg, dtype, bias=True)
    before, weight = _snapshot(q), q.dequantized_weight()
    x = torch.randn(3, IN).to(dtype)
    ref = kernels.reference(x, q.weight_packed, q.weight_scale, q.bias, cfg)
    stored = weakref.ref(q.weight_packed)
    with torch.no_grad():
        y = q(x)
    assert stored() is None  # the copy the kernel would sit beside is gone: only the host's is kept
    host = q.weight_packed
    assert host.device == kernels.HOST and kernels.cached(q.repacked, host, q.weight_scale) is not None
    torch.testing.assert_close(y, ref, **_tol(dtype))
    with torch.no_grad():
        torch.testing.assert_close(q(x), y, rtol=0, atol=0)
    assert q.weight_packed is host  # released once
    _assert_same(_snapshot(q), before)
    assert torch.equal(q.dequantized_weight(), weight) and torch.equal(q.dequantized_weight(torch.float32),
                                                                       weight.float())


@pytest.mark.parametrize("cfg, dtype", RELEASED, ids=[_case(c) for c in RELEASED])
def test_many_rows_after_the_release_run_from_the_repacked_weight(repacking_cpu, monkeypatch, cfg, dtype):
    q = _layer(cfg, dtype, bias=True)
    many = torch.randn(2, kernels.CUDA_MAX_ROWS, IN).to(dtype)
    ref = kernels.reference(many, q.weight_packed, q.weight_scale, q.bias, cfg)
    with torch.no_grad():
        q(many[0, :1])
        monkeypatch.setattr(kernels, "unpack_ints", None)  # the stored weight is not read again
        y = q(many)
    if cfg.bits == 8:  # the weight's own values and scales: the reference's numbers exactly
        assert torch.equal(y, ref)
    else:
        torch.testing.assert_close(y, ref, **_tol(dtype))


@pytest.mark.parametrize("cfg", [QuantConfig("w8a16"), QuantConfig("w4a16", 64)], ids=_name)
def test_a_released_layer_still_gives_gradients(repacking_cpu, cfg):
    q = _layer(cfg, torch.float32, bias=True)
    q.bias.requires_grad_(True)
    x = torch.randn(5, IN, requires_grad=True)
    x_ref, b_ref = x.detach().clone().requires_grad_(True), q.bias.detach().clone().requires_grad_(True)
    kernels.reference(x_ref, q.weight_packed, q.weight_scale, b_ref, cfg).square().sum().backward()
    with torch.no_grad():
        q(x[:1])
    assert q.repacked["cuda"][-1] is not None
    q(x).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(q.bias.grad, b_ref.grad)


@pytest.mark.parametrize("cfg", [QuantConfig("w8a16"), QuantConfig("w4a16", 32)], ids=_name)
def test_qlora_trains_on_a_base_released_by_its_own_forward(repacking_cpu, cfg):
    base = _layer(cfg)
    weight = base.dequantized_weight(torch.float32)
    layer = QLoRALinear(base, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    stored = weakref.ref(base.weight_packed)
    x = torch.randn(2, 3, IN, requires_grad=True)
    layer(x).square().sum().backward()  # the frozen product runs without autograd: it repacks and releases
    assert stored() is None
    x_ref = x.detach().clone().requires_grad_(True)
    a, b = (p.detach().clone().requires_grad_(True) for p in (layer.lora_A, layer.lora_B))
    (torch.nn.functional.linear(x_ref, weight) + x_ref @ a.T @ b.T * layer.scaling).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(layer.lora_A.grad, a.grad, atol=1e-3, rtol=1e-4)
    assert torch.equal(layer.merge().weight, (weight + b.detach() @ a.detach() * layer.scaling))


@pytest.mark.parametrize("how", ["set_weight", "load_state_dict"])
@pytest.mark.parametrize("cfg", [QuantConfig("w8a16"), QuantConfig("w4a16", 32)], ids=_name)
def test_a_new_weight_after_the_release_is_stored_and_repacked(repacking_cpu, cfg, how):
    q, w = _layer(cfg), torch.randn(OUT, IN)
    fresh = QuantLinear(IN, OUT, False, cfg, "replicated")
    fresh.set_weight(w)
    x = torch.randn(2, IN)
    with torch.inference_mode():  # as the engine runs it: the host copy must still take writes afterwards
        q(x)
    with torch.no_grad():
        first = q.repacked["cuda"][-1]
        if how == "set_weight":
            q.set_weight(w)
        else:
            q.load_state_dict(fresh.state_dict())
        _assert_same(_snapshot(q), _snapshot(fresh))
        y = q(x)
    assert q.repacked["cuda"][-1] is not first
    torch.testing.assert_close(y, kernels.reference(x, fresh.weight_packed, fresh.weight_scale, None, cfg))


@pytest.mark.parametrize("cfg", [QuantConfig("w8a16"), QuantConfig("w4a16", 32)], ids=_name)
def test_a_fused_product_keeps_one_copy_and_its_layers_stay_whole(repacking_cpu, cfg):
    layers = [_layer(cfg, out=n, seed=i) for i, n in enumerate((96, 32, 32))]
    before = [_snapshot(m) for m in layers]
    x = torch.randn(3, IN)
    ref = kernels.reference(x, torch.cat([m.weight_packed for m in layers]),
                            torch.cat([m.weight_scale for m in layers]), None, cfg)
    refs = [kernels.reference(x, m.weight_packed, m.weight_scale, None, cfg) for m in layers]
    with torch.no_grad():
        layers[0](x)  # a layer repacked (and released) on its own before fusing: the product replaces its copy
    product = QuantLinear.fuse(layers)
    assert all(m.repacked == {} for m in layers)
    stored = weakref.ref(product.packed)
    with torch.inference_mode():
        y = product(x)
    assert stored() is None and product.packed.device == kernels.HOST
    torch.testing.assert_close(y, ref)
    for m, state, r in zip(layers, before, refs, strict=True):
        assert m.weight_packed.untyped_storage().data_ptr() == product.packed.untyped_storage().data_ptr()
        _assert_same(_snapshot(m), state)
        torch.testing.assert_close(m(x), r)  # autograd on: a layer's own product, from the host's views
    layers[1].set_weight(torch.randn(32, IN))  # written through the view: the product repacks
    with torch.no_grad():
        y = product(x)
    torch.testing.assert_close(y[:, 96:128], kernels.reference(x, layers[1].weight_packed, layers[1].weight_scale,
                                                               None, cfg))


def test_a_move_drops_the_repacked_weight(repacking_cpu):
    cfg = QuantConfig("w4a16", 32)
    q = _layer(cfg)
    x = torch.randn(2, IN)
    with torch.no_grad():
        q(x)
        assert q.repacked
        q.to("cpu", torch.bfloat16)
        assert q.repacked == {} and q.weight_scale.dtype == torch.bfloat16
        y = q(x.bfloat16())
    assert q.repacked["cuda"][1] == torch.bfloat16
    torch.testing.assert_close(y, kernels.reference(x.bfloat16(), q.weight_packed, q.weight_scale, None, cfg),
                               **_tol(torch.bfloat16))


def test_a_layout_the_ops_cannot_take_keeps_its_stored_weight(repacking_cpu):
    torch.manual_seed(0)
    q = QuantLinear.from_linear(linear(320, OUT), QuantConfig("w8a16", 64))
    stored = q.weight_packed
    with torch.no_grad():
        q(torch.randn(1, 320))
    assert q.weight_packed is stored and q.repacked["cuda"][-1] is None


@needs_cuda
@pytest.mark.parametrize("cfg", [QuantConfig("w8a16"), QuantConfig("w4a16")], ids=_name)
def test_cuda_holds_one_copy_of_a_repacked_weight(cfg):
    torch.manual_seed(0)
    q = QuantLinear.from_linear(linear(4096, 4096).to("cuda", torch.bfloat16), cfg)
    stored_bytes = q.weight_packed.numel() * q.weight_packed.element_size()
    before = _snapshot(q)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    many = torch.randn(3 * kernels.CUDA_MAX_ROWS, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref, ref_many = (kernels.reference(t, q.weight_packed, q.weight_scale, None, cfg) for t in (x, many))
        weight = q.dequantized_weight()
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        y = q(x)
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated() - allocated
        y_many = q(many)
    assert q.repacked["cuda"][-1] is not None and q.weight_packed.device == kernels.HOST
    assert grown < stored_bytes // 4, (grown, stored_bytes)  # the repacked copy replaced the stored one
    torch.testing.assert_close(y, ref, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(y_many, ref_many, rtol=3e-2, atol=3e-2)
    _assert_same(_snapshot(q), before)
    assert torch.equal(q.dequantized_weight(), weight)
