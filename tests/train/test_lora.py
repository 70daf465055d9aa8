"""LoRA transform: trainable set, zero-init identity, merge parity (fp32, bf16), peft-format round trip."""

from __future__ import annotations

import json
import re

import pytest
import torch
from checkpoints import build_hf_model, processor_config, write_hf_checkpoint
from conftest import noise_image
from parity import our_last_logits
from safetensors.torch import load_file, save_file

import llavakit
from llavakit.layers.linear import Linear
from llavakit.train.lora import (
    DEFAULT_TARGETS,
    NON_LORA_FILE,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from llavakit.train.merge import merge_lora_checkpoint

LAYERS = 2  # text_config_dict's num_hidden_layers
R, ALPHA = 8, 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    hf = build_hf_model("llava")
    return write_hf_checkpoint(hf, tmp_path_factory.mktemp("lora") / "base", "hub",
                               processor=processor_config("LlavaImageProcessor", do_pad=True))


def _load(d, dtype="float32"):
    return llavakit.load(d, dtype=dtype, device="cpu")


def _inputs(pipe):
    prepared = pipe.processor.prepare_images([noise_image(60, 40)])
    return pipe.processor.tokenize(pipe.processor.render_prompt("Describe it.", 1), prepared), prepared


def _logits(pipe, inputs) -> torch.Tensor:
    return our_last_logits(pipe, *inputs)


def _randomize_b(model, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.05)


def _train_projector(model, seed: int = 2) -> None:
    """Stand-in for a LoRA run's fully trained projector."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def test_only_adapters_train_and_init_is_identity(ckpt):
    pipe = _load(ckpt)
    inputs = _inputs(pipe)
    base = _logits(pipe, inputs)
    apply_lora(pipe.model, r=R, alpha=ALPHA)
    trainable = [n for n, p in pipe.model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(DEFAULT_TARGETS) * LAYERS
    assert all(n.startswith("language_model.layers.") and n.endswith((".lora_A", ".lora_B")) for n in trainable)
    q = pipe.model.language_model.layers[0].self_attn.q_proj
    assert q.lora_A.shape == (R, 64) and q.lora_B.shape == (64, R) and q.scaling == ALPHA / R
    assert not isinstance(pipe.model.vision_tower.encoder.layers[0].self_attn.q_proj, LoRALinear)
    assert not isinstance(pipe.model.projector[0], LoRALinear) and not isinstance(pipe.model.lm_head, LoRALinear)
    torch.testing.assert_close(_logits(pipe, inputs), base, atol=0, rtol=0)

    ids, prepared = inputs
    model = pipe.model.train()
    feats = model.encode_images([p.pixel_values for p in prepared], [p.size for p in prepared])
    hidden = model(model.embed_inputs(torch.tensor([ids]), feats), torch.arange(len(ids))[None])
    model.compute_logits(hidden).sum().backward()
    assert q.lora_B.grad.abs().sum() > 0 and q.weight.grad is None


def test_parameter_names_and_tp_style_kept(ckpt):
    model = _load(ckpt).model
    before = {n: (p, getattr(model.get_submodule(n.rpartition(".")[0]), "tp_style", None))
              for n, p in model.named_parameters()}
    apply_lora(model, r=R, alpha=ALPHA)
    after = dict(model.named_parameters())
    for name, (param, style) in before.items():
        assert after[name] is param  # same Parameter object: optimizer and checkpoint state stay valid
        assert getattr(model.get_submodule(name.rpartition(".")[0]), "tp_style", None) == style
    attn, mlp = model.language_model.layers[1].self_attn, model.language_model.layers[1].mlp
    assert (attn.q_proj.tp_style, attn.o_proj.tp_style, mlp.down_proj.tp_style) == ("column", "row", "row")
    assert isinstance(attn.q_proj, Linear)


def test_merge_matches_unmerged_and_differs_from_base(ckpt):
    pipe = _load(ckpt)
    inputs = _inputs(pipe)
    base = _logits(pipe, inputs)
    apply_lora(pipe.model, r=R, alpha=ALPHA)
    _randomize_b(pipe.model)
    unmerged = _logits(pipe, inputs)
    merge_lora(pipe.model)
    assert not any(isinstance(m, LoRALinear) for m in pipe.model.modules())
    assert type(pipe.model.language_model.layers[0].mlp.up_proj) is Linear
    assert pipe.model.language_model.layers[0].mlp.down_proj.tp_style == "row"
    assert not any("lora" in n for n in pipe.model.state_dict())
    merged = _logits(pipe, inputs)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert (merged - base).abs().max() > 1e-2


def test_merge_bf16_sums_in_fp32(ckpt):
    model32, model16 = _load(ckpt).model, _load(ckpt, "bfloat16").model
    for m in (model32, model16):
        apply_lora(m, r=R, alpha=ALPHA)
    _randomize_b(model32)
    with torch.no_grad():
        for name, m in model32.named_modules():
            if isinstance(m, LoRALinear):
                m16 = model16.get_submodule(name)
                m16.lora_A.copy_(m.lora_A)
                m16.lora_B.copy_(m.lora_B)
    q16 = model16.language_model.layers[0].self_attn.q_proj
    expected = (q16.weight.float() + q16.lora_B.float() @ q16.lora_A.float() * q16.scaling).to(torch.bfloat16)
    merge_lora(model32), merge_lora(model16)
    w16 = model16.language_model.layers[0].self_attn.q_proj.weight
    assert w16.dtype == torch.bfloat16
    torch.testing.assert_close(w16, expected, atol=0, rtol=0)
    for name, p in model16.named_parameters():
        torch.testing.assert_close(p.float(), model32.get_parameter(name), atol=1e-3, rtol=1.6e-2)


def test_save_load_adapter_round_trip(ckpt, tmp_path):
    pipe = _load(ckpt)
    inputs = _inputs(pipe)
    apply_lora(pipe.model, r=R, alpha=ALPHA, dropout=0.1)
    _randomize_b(pipe.model)
    _train_projector(pipe.model)
    want = _logits(pipe, inputs)
    out = save_adapter(pipe.model, tmp_path / "adapter", "llava-hf/tiny", r=R, alpha=ALPHA, dropout=0.1)

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert {k: cfg[k] for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "base_model_name_or_path", "bias",
                                "task_type", "fan_in_fan_out", "inference_mode")} == dict(
        peft_type="LORA", r=R, lora_alpha=ALPHA, lora_dropout=0.1, base_model_name_or_path="llava-hf/tiny",
        bias="none", task_type=None, fan_in_fan_out=False, inference_mode=True)
    assert re.fullmatch(cfg["target_modules"], "language_model.model.layers.1.mlp.down_proj")
    assert re.fullmatch(cfg["target_modules"], "model.language_model.layers.1.mlp.down_proj")
    assert not re.fullmatch(cfg["target_modules"], "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")

    keys = set(lora_state_dict(pipe.model))
    assert len(keys) == 2 * len(DEFAULT_TARGETS) * LAYERS
    assert "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.language_model.model.layers.1.mlp.down_proj.lora_B.weight" in keys

    trained = load_file(out / NON_LORA_FILE)  # llava-hf names, as transformers users load them
    assert sorted(trained) == [f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("bias", "weight")]
    torch.testing.assert_close(trained["multi_modal_projector.linear_2.weight"], pipe.model.projector[2].weight)

    fresh = _load(ckpt)
    load_adapter(fresh.model, out)
    torch.testing.assert_close(_logits(fresh, inputs), want, atol=0, rtol=0)
    assert fresh.model.language_model.layers[0].self_attn.q_proj.scaling == ALPHA / R

    # peft on transformers 5 saves in-memory names: base_model.model.model.language_model.layers.*,
    # and a transformers-5 state dict names the projector model.multi_modal_projector.*
    tensors = load_file(out / "adapter_model.safetensors")
    save_file({k.replace(".language_model.model.", ".model.language_model."): v for k, v in tensors.items()},
              out / "adapter_model.safetensors")
    save_file({"model." + k: v for k, v in trained.items()}, out / NON_LORA_FILE)

    fresh = _load(ckpt)
    load_adapter(fresh.model, out)
    torch.testing.assert_close(_logits(fresh, inputs), want, atol=0, rtol=0)


def test_adapters_with_the_projector_under_llavakit_names_still_load(ckpt, tmp_path):
    # Directories written before the projector was saved under llava-hf names hold `projector.0.weight`.
    pipe = _load(ckpt)
    apply_lora(pipe.model, r=R, alpha=ALPHA)
    _randomize_b(pipe.model)
    _train_projector(pipe.model)
    out = save_adapter(pipe.model, tmp_path / "old", str(ckpt), r=R, alpha=ALPHA)
    save_file({n: p.detach().contiguous() for n, p in pipe.model.named_parameters() if n.startswith("projector.")},
              out / NON_LORA_FILE)
    merged = _load(merge_lora_checkpoint(ckpt, out, tmp_path / "merged", "float32"))
    for name, p in merged.model.projector.named_parameters():
        torch.testing.assert_close(p, pipe.model.projector.get_parameter(name), atol=0, rtol=0)


def test_a_projector_file_for_another_model_is_refused_before_loading(ckpt, tmp_path):
    pipe = _load(ckpt)
    apply_lora(pipe.model, r=R, alpha=ALPHA)
    out = save_adapter(pipe.model, tmp_path / "a", str(ckpt), r=R, alpha=ALPHA)
    save_file({"multi_modal_projector.linear_1.weight": torch.zeros(64, 48)}, out / NON_LORA_FILE)
    fresh = _load(ckpt).model
    with pytest.raises(ValueError, match=r"non_lora_trainables.safetensors: 1 tensors fit no parameter of this "
                                         r"model: multi_modal_projector.linear_1.weight \(64, 48\); is the adapter"):
        load_adapter(fresh, out)
    assert not any(isinstance(m, LoRALinear) for m in fresh.modules())  # untouched


def test_load_adapter_rejects_foreign_keys_and_shapes(ckpt, tmp_path):
    model = apply_lora(_load(ckpt).model, r=R, alpha=ALPHA)
    out = save_adapter(model, tmp_path / "a", "x", r=R, alpha=ALPHA)
    tensors = load_file(out / "adapter_model.safetensors")
    bad_key = "base_model.model.language_model.model.layers.7.self_attn.q_proj.lora_A.weight"
    save_file({**tensors, bad_key: torch.zeros(R, 64)}, out / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="layers.7.self_attn.q_proj"):
        load_adapter(_load(ckpt).model, out)
    save_file({**tensors, "base_model.model.foo.weight": torch.zeros(1)}, out / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="foo.weight"):
        load_adapter(_load(ckpt).model, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
    save_file(tensors, out / "adapter_model.safetensors")
    untouched = _load(ckpt).model
    with pytest.raises(ValueError, match=r"has shape \(8, \d+\), expected \(4, \d+\)"):
        load_adapter(untouched, out)
    assert not any(isinstance(m, LoRALinear) for m in untouched.modules())
    with pytest.raises(ValueError, match="r=8, alpha=16"):
        save_adapter(model, tmp_path / "b", "x", r=4, alpha=ALPHA)


def test_peft_reads_our_adapter_and_we_read_peft_adapters(ckpt, tmp_path):
    """Interop with peft + transformers on the same checkpoint, both directions (fp32 logits within 1e-5)."""
    peft = pytest.importorskip("peft")
    from parity import hf_processor

    hf = build_hf_model("llava")  # the weights written to `ckpt`
    pipe = _load(ckpt)
    ids, prepared = inputs = _inputs(pipe)
    image = [noise_image(60, 40)]
    hf_inputs = hf_processor("llava", ckpt)(images=image, text=pipe.processor.render_prompt("Describe it.", 1),
                                            return_tensors="pt")
    assert hf_inputs["input_ids"][0].tolist() == ids
    apply_lora(pipe.model, r=R, alpha=ALPHA)
    _randomize_b(pipe.model)
    ours = save_adapter(pipe.model, tmp_path / "ours", str(ckpt), r=R, alpha=ALPHA)
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(hf, ours).eval()(**hf_inputs).logits[0, -1]
    torch.testing.assert_close(_logits(pipe, inputs), ref, atol=1e-5, rtol=1e-5)

    # A list of target names also wraps the CLIP tower's q/v_proj, as peft does.
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(build_hf_model("llava"), cfg).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        ref = theirs(**hf_inputs).logits[0, -1]
    fresh = _load(ckpt)
    load_adapter(fresh.model, tmp_path / "theirs")
    assert isinstance(fresh.model.vision_tower.encoder.layers[0].self_attn.q_proj, LoRALinear)
    torch.testing.assert_close(_logits(fresh, inputs), ref, atol=1e-5, rtol=1e-5)
