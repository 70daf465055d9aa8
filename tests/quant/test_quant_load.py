"""Quantize-on-load and compressed-tensors checkpoints.

Loading with quantization= must give exactly `quantize(load())` (each layer quantized as it is read, never
the whole float model); `convert --quantization` must write a compressed-tensors checkpoint that llavakit
reads back with no flag and transformers (with the compressed-tensors package) reads to the same greedy
tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import build_hf_model, text_config_dict, write_hf_checkpoint
from conftest import noise_image
from parity import PROMPT, our_last_logits

import llavakit
from llavakit.cli import main
from llavakit.quant import QuantConfig, quantize
from llavakit.quant.linear import QuantLinear
from llavakit.weights.files import WeightsError

IMAGE = noise_image(50, 30)
# Tiny dims: hidden 64, intermediate 128, so groups of 32 divide every language-model Linear.
W4 = QuantConfig("w4a16", group_size=32)
W8 = QuantConfig("w8a16")


def _load(d, **kw):
    return llavakit.load(d, dtype="float32", device="cpu", **kw)


def _same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        assert v.dtype == sb[k].dtype and torch.equal(v, sb[k]), k


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = build_hf_model("llava", text=text_config_dict(num_key_value_heads=2), seed=11)
    return hf, write_hf_checkpoint(hf, tmp_path_factory.mktemp("ck") / "src", "hub")


@pytest.mark.parametrize("cfg", [W8, W4, QuantConfig("w8a16", lm_head=True)], ids=str)
def test_quantize_on_load_equals_quantizing_the_loaded_model(checkpoint, cfg):
    _, d = checkpoint
    loaded = _load(d, quantization=cfg)
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 * 7 + cfg.lm_head and all(m.cfg == cfg for m in layers)
    assert not any(isinstance(m, QuantLinear) for m in loaded.model.vision_tower.modules())
    _same_state(loaded.model, quantize(_load(d).model, cfg))


def test_dummy_weights_quantize_layer_by_layer_to_the_same_model():
    kw = dict(load_format="dummy", dtype="bfloat16", device="cpu")
    _same_state(llavakit.load("tiny", quantization="w8a16", **kw).model,
                quantize(llavakit.load("tiny", **kw).model, "w8a16"))


def test_llm_takes_quantization(checkpoint):
    llm = llavakit.LLM(str(checkpoint[1]), dtype="float32", device="cpu", quantization=W4, max_num_seqs=2,
                       max_model_len=128, num_kv_blocks=16)
    assert isinstance(llm.pipe.model.language_model.layers[0].mlp.down_proj, QuantLinear)


PEAK_SCRIPT = """
import dataclasses, sys, torch
from llavakit.config import TextConfig
from llavakit.presets import preset_config
from llavakit.quant import QuantConfig
from llavakit.quant.formats import quantize_weight
from llavakit.weights.loader import random_llava
text = TextConfig(vocab_size=1024, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                  num_attention_heads=8)
cfg = dataclasses.replace(preset_config("tiny"), text=text)
quantization = QuantConfig(sys.argv[1]) if len(sys.argv) > 1 else None
quantize_weight(torch.randn(64, 256), QuantConfig("w4a16"))  # the kernels' own memory is not the model's
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the resident size now: an import's peak must not count
base = status("VmRSS")
model = random_llava(cfg, torch.float32, torch.device("cpu"), quantization=quantization)
print(sum(t.numel() * t.element_size() for t in model.state_dict().values()), status("VmHWM") - base)
"""


def _peak(*argv) -> tuple[int, int]:
    """(model bytes, peak RSS growth while building it) in a fresh process. A fixed mmap threshold makes glibc
    hand every freed temporary back at once; by default it may keep them, by chance of allocation order, so
    the peak would measure the allocator's cache (0.2-0.5 GB here, from run to run) rather than the loader."""
    env = {"OMP_NUM_THREADS": "1", "PATH": "", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *argv], capture_output=True, text=True, timeout=120,
                         env=env, check=True)
    return tuple(int(x) for x in out.stdout.split())


def test_peak_memory_is_the_quantized_model_plus_one_layer():
    """An 8-layer decoder whose float32 Linears are ~540 MB: quantizing it as it is built must never hold
    them all (the growth is the quantized model plus about one float layer and its temporaries)."""
    quant_bytes, quant_growth = _peak("w4a16")
    float_bytes, float_growth = _peak()
    assert quant_bytes < 0.2 * float_bytes and float_growth > 0.9 * float_bytes
    # Measured growth: 0.15-0.32 GB (the spread is the allocator's, not the loader's); holding every float
    # Linear at once would be at least the float model's 0.55 GB.
    assert quant_growth < quant_bytes + 0.6 * float_bytes, (quant_bytes, quant_growth, float_bytes)


@pytest.fixture(scope="module", params=[W8, W4], ids=str)
def compressed(request, checkpoint, tmp_path_factory):
    """A checkpoint written by `convert --quantization`."""
    cfg = request.param
    out = tmp_path_factory.mktemp("ct") / cfg.method
    flags = ["--quantization", cfg.method] + (["--group-size", str(cfg.group_size)] if cfg.group_size else [])
    assert main(["convert", "--model", str(checkpoint[1]), "--out", str(out), *flags]) == 0
    return cfg, out


def test_convert_writes_compressed_tensors(compressed):
    cfg, out = compressed
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    assert block["quant_method"] == "compressed-tensors" and block["format"] == "pack-quantized"
    assert block["config_groups"]["group_0"]["weights"]["num_bits"] == cfg.bits
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    q = "language_model.model.layers.0.self_attn.q_proj."
    assert {q + s for s in ("weight_packed", "weight_scale", "weight_shape")} <= names and q + "weight" not in names
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in names
    assert "language_model.lm_head.weight" in names and "multi_modal_projector.linear_1.weight" in names


def test_llavakit_reads_it_back_without_a_flag(compressed, checkpoint):
    cfg, out = compressed
    back = _load(out)
    _same_state(back.model, _load(checkpoint[1], quantization=cfg).model)
    assert _load(out, quantization=cfg).model.state_dict().keys() == back.model.state_dict().keys()
    other = W8 if cfg == W4 else W4
    with pytest.raises(ValueError, match=r"already quantized .* drop quantization="):
        _load(out, quantization=other)


def test_transformers_gives_the_same_greedy_tokens(compressed, checkpoint):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForImageTextToText

    cfg, out = compressed
    pipe = _load(out)
    prepared = pipe.processor.prepare_images([IMAGE])
    ids = pipe.processor.tokenize(pipe.processor.render_prompt(PROMPT, 1), prepared)
    ref, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    t = torch.tensor([ids])
    inputs = dict(input_ids=t, attention_mask=torch.ones_like(t), pixel_values=prepared[0].pixel_values)
    with torch.no_grad():
        theirs = ref.eval()(**inputs).logits[0, -1]
        float_logits = checkpoint[0](**inputs).logits[0, -1]
        tokens = ref.generate(**inputs, max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    ours = our_last_logits(pipe, ids, prepared)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (ours - float_logits).abs().max() > 1e-4  # the weights really are quantized
    assert pipe.generate(PROMPT, images=[IMAGE], max_new_tokens=12, temperature=0).token_ids == tokens


def _linked_copy(src: Path, dst: Path, replaced: str) -> Path:
    """`dst`: links to the files of checkpoint `src`, but `replaced`, which the caller writes."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != replaced:
            (dst / f.name).symlink_to(f)
    return dst / replaced


def test_unsupported_compressed_tensors_schemes_are_refused(compressed, tmp_path):
    _, out = compressed
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    _linked_copy(out, tmp_path / "bad", "config.json").write_text(json.dumps(cfg))
    bad = tmp_path / "bad"
    with pytest.raises(ValueError, match="cannot run this compressed-tensors checkpoint: quantized activations"):
        _load(bad)


def test_a_float_weight_of_the_wrong_shape_is_named(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    _, d = checkpoint
    state = load_file(d / "model.safetensors")
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    state[name] = state[name][:64]
    save_file(state, _linked_copy(d, tmp_path / "bad", "model.safetensors"))
    bad = tmp_path / "bad"
    with pytest.raises(WeightsError, match=r"tensor language_model\.layers\.1\.mlp\.up_proj\.weight: expected shape "
                                           r"\(128, 64\), checkpoint has \(64, 64\)"):
        _load(bad, quantization=W8)


def test_generate_command_quantizes_with_the_flags(checkpoint, capsys):
    _, d = checkpoint
    argv = ["generate", "--model", str(d), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "6",
            "--dtype", "float32", "--device", "cpu", "--threads", "1"]
    assert main([*argv, "--quantization", "w4a16", "--group-size", "32"]) == 0
    quantized = capsys.readouterr().out.strip()
    assert quantized == _load(d, quantization=W4).generate(PROMPT, max_new_tokens=6, temperature=0).text.strip()
    assert main([*argv, "--group-size", "32"]) == 2
    assert "need --quantization" in capsys.readouterr().err
