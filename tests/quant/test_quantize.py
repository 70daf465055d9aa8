"""quantize(model, cfg) on tiny checkpoints: what changes, how close the logits stay, fusion, the engine."""

from __future__ import annotations

import copy

import pytest
import torch
from checkpoints import PINPOINTS, build_hf_model, processor_config, text_config_dict, write_hf_checkpoint
from conftest import noise_image
from engine_runs import engine_for, run

import llavakit
from llavakit.config import EngineConfig
from llavakit.layers.linear import Linear
from llavakit.models.llama import fuse_projections
from llavakit.quant import QuantConfig, quantize, quantize_skeleton
from llavakit.quant.linear import QuantLinear
from llavakit.sampling import SamplingParams

# Tolerances on the tiny random model (hidden 64, MLP 128, 2 layers), measured ~3x below them: the largest logit
# error relative to the largest logit, and the cosine similarity of the flattened logits.
TOLERANCE = {"w8a16": (0.03, 0.9995), "w4a16": (0.35, 0.97)}
CFGS = [QuantConfig("w8a16"), QuantConfig("w4a16", 32), QuantConfig("w4a16", 16)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    hf = build_hf_model("llava_next", text=text_config_dict(num_key_value_heads=2), seed=11)
    return write_hf_checkpoint(hf, tmp_path_factory.mktemp("quant") / "ck", "hub",
                               processor=processor_config("LlavaNextImageProcessor", image_grid_pinpoints=PINPOINTS))


@pytest.fixture(scope="module")
def pipe(ckpt):
    return llavakit.load(ckpt, dtype="float32", device="cpu")


IDS = torch.randint(0, 32000, (1, 24), generator=torch.Generator().manual_seed(3))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(model.embed_inputs(IDS), torch.arange(IDS.shape[1])[None])
        return model.compute_logits(hidden)


def test_only_the_language_models_linears_are_replaced(pipe):
    model = quantize(copy.deepcopy(pipe.model), QuantConfig("w8a16"))
    lm = [m for m in model.language_model.modules() if isinstance(m, (Linear, QuantLinear))]
    assert len(lm) == 2 * 7 and all(isinstance(m, QuantLinear) for m in lm)
    assert type(model.lm_head) is Linear  # the LM head stays float unless asked
    float_sd = pipe.model.state_dict()
    for prefix in ("vision_tower.", "projector.", "image_newline", "language_model.embed_tokens.",
                   "language_model.norm.", "lm_head."):
        kept = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
        assert kept and all(torch.equal(v, float_sd[k]) and v.dtype == torch.float32 for k, v in kept.items())
    assert "language_model.layers.0.self_attn.q_proj.weight_packed" in model.state_dict()
    with_head = quantize(copy.deepcopy(pipe.model), QuantConfig("w8a16", lm_head=True))
    assert isinstance(with_head.lm_head, QuantLinear) and with_head.lm_head.tp_style == "column"


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: f"{c.method}-g{c.group_size}")
def test_logits_stay_within_the_stated_tolerance_of_float(pipe, cfg):
    ref = logits(pipe.model)
    got = logits(quantize(copy.deepcopy(pipe.model), cfg))
    max_rel, min_cos = TOLERANCE[cfg.method]
    rel = float((got - ref).abs().max() / ref.abs().max())
    cos = float(torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0))
    assert 0 < rel <= max_rel and cos >= min_cos, (rel, cos)


def test_quantized_model_is_the_float_model_with_dequantized_weights(pipe):
    cfg = QuantConfig("w4a16", 32, lm_head=True)
    q = quantize(copy.deepcopy(pipe.model), cfg)
    f = copy.deepcopy(pipe.model)
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, QuantLinear):
                f.get_submodule(name).weight.copy_(m.dequantized_weight())
    torch.testing.assert_close(logits(q), logits(f), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", CFGS[:2], ids=lambda c: c.method)
def test_fusing_after_quantizing_keeps_the_logits(pipe, cfg):
    model = quantize(copy.deepcopy(pipe.model), cfg)
    before = logits(model)
    assert fuse_projections(model.language_model) == 2 * 2  # q/k/v and gate/up of both layers
    assert fuse_projections(model.language_model) == 0
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


def test_quantizing_after_fusing_drops_the_float_fused_weights(pipe):
    cfg = QuantConfig("w4a16", 32)
    expected = logits(quantize(copy.deepcopy(pipe.model), cfg))
    model = copy.deepcopy(pipe.model)
    assert fuse_projections(model.language_model) == 4
    quantize(model, cfg)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    assert fuse_projections(model.language_model) == 4  # and the quantized layers fuse again
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)


def test_a_skeleton_filled_from_a_quantized_state_dict_is_the_same_model(pipe):
    cfg = QuantConfig("w8a16", lm_head=True)
    q = quantize(copy.deepcopy(pipe.model), cfg)
    skeleton = quantize_skeleton(copy.deepcopy(pipe.model), cfg)
    assert sorted(skeleton.state_dict()) == sorted(q.state_dict())
    skeleton.load_state_dict(q.state_dict())
    assert torch.equal(logits(skeleton), logits(q))


def test_group_size_that_does_not_divide_a_layer_is_refused(pipe):
    with pytest.raises(ValueError, match="choose a group size that divides 64"):
        quantize(copy.deepcopy(pipe.model), QuantConfig("w4a16", 128))


@pytest.mark.parametrize("cfg, fused", [(CFGS[0], False), (CFGS[1], True), (QuantConfig("w8a16", lm_head=True), False)],
                         ids=["w8a16", "w4a16-fused", "w8a16-lm-head"])
def test_engine_and_plain_loop_give_the_same_greedy_tokens(ckpt, cfg, fused):
    pipe = llavakit.load(ckpt, dtype="float32", device="cpu")
    quantize(pipe.model, cfg)
    if fused:  # as the engine does before capturing CUDA graphs
        assert fuse_projections(pipe.model.language_model) == 4
    reqs = [{"prompt": "What is this?", "images": [noise_image(100, 30, seed=1)]},
            {"prompt": "Describe the picture in detail please.", "images": [noise_image(25, 90, seed=2)]},
            {"prompt": "No image here, just text."}]
    params = [SamplingParams(max_tokens=n) for n in (12, 7, 9)]
    outs = run(engine_for(pipe, EngineConfig(num_kv_blocks=256)), pipe, reqs, params)
    assert isinstance(pipe.model.language_model.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(pipe.model.lm_head, QuantLinear) == cfg.lm_head  # a quantized head has no .weight to ask
    for req, p, out in zip(reqs, params, outs, strict=True):
        ref = pipe.generate(req["prompt"], images=req.get("images"), max_new_tokens=p.max_tokens)
        assert out.token_ids == ref.token_ids and len(ref.token_ids) == p.max_tokens
