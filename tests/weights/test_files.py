"""Every weight-file format and load dtype gives the model transformers has.

One tiny llava-hf checkpoint is saved as model.safetensors, safetensors shards with an index,
pytorch_model.bin (zip and legacy serialization) and .bin shards with an index; each must load to the
same last-position logits as the transformers model. float16 / bfloat16 loads must give parameters of
that dtype and logits near fp32. The CLIP tower must stop at the feature layer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import IMAGE_TOKEN_ID, build_hf_model, processor_config, vision_config_dict, write_hf_checkpoint
from conftest import noise_image
from parity import PROMPT, our_last_logits
from safetensors import safe_open
from safetensors.torch import load_file

import llavakit
from llavakit.weights.files import find_weight_files

PROCESSOR = processor_config("LlavaImageProcessor", do_pad=True)
IMAGE = noise_image(50, 40)


def last_logits(pipe, image=IMAGE) -> torch.Tensor:
    """fp32 last-position logits of a one-image prompt, plus the ids and pixels that produced them."""
    prepared = pipe.processor.prepare_images([image])
    ids = pipe.processor.tokenize(pipe.processor.render_prompt(PROMPT, 1), prepared)
    return our_last_logits(pipe, ids, prepared).float(), ids, prepared[0].pixel_values


def hf_last_logits(hf, ids: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids]), pixel_values=pixel_values).logits[0, -1]


def _load(directory: Path, dtype: str = "float32"):
    return llavakit.load(directory, dtype=dtype, device="cpu")


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """(transformers model, safetensors checkpoint dir, fp32 pipe, its logits) shared by the tests."""
    hf = build_hf_model("llava")
    d = write_hf_checkpoint(hf, tmp_path_factory.mktemp("files") / "single", "hub", processor=PROCESSOR)
    pipe = _load(d)
    logits, ids, pixels = last_logits(pipe)
    assert ids.count(IMAGE_TOKEN_ID) == 4
    torch.testing.assert_close(logits, hf_last_logits(hf, ids, pixels), atol=1e-4, rtol=1e-4)
    return hf, d, pipe, logits


def _as_bin(single: Path, target: Path, shards: int = 1, zip_format: bool = True) -> Path:
    """The checkpoint with its weights re-saved by torch.save (one file, or shards with an index)."""
    d = Path(shutil.copytree(single, target))
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    if shards == 1:
        torch.save(state, d / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
        return d
    keys, weight_map = sorted(state), {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k] for k in keys[i::shards]}, d / name)
        weight_map.update({k: name for k in keys[i::shards]})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


@pytest.mark.parametrize("shards, zip_format", [(1, True), (1, False), (2, True)],
                         ids=["bin", "legacy-bin", "bin-shards"])
def test_pytorch_bin_matches_safetensors(ref, tmp_path, shards, zip_format):
    _, single, _, logits = ref
    d = _as_bin(single, tmp_path / "bin", shards, zip_format)
    assert [f.suffix for f in find_weight_files(d)] == [".bin"] * shards
    ours, _, _ = last_logits(_load(d))
    torch.testing.assert_close(ours, logits, atol=0, rtol=0)


def test_sharded_safetensors(ref, tmp_path):
    hf, _, _, logits = ref
    d = write_hf_checkpoint(hf, tmp_path / "sharded", "hub", processor=PROCESSOR, shards=3)
    files = find_weight_files(d)
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    pipe = _load(d)
    torch.testing.assert_close(last_logits(pipe)[0], logits, atol=0, rtol=0)
    loaded = {n: p for n, p in pipe.model.named_parameters()}
    for name, p in ref[2].model.named_parameters():  # every parameter, from whichever shard held it
        assert torch.equal(loaded[name], p), name


# Measured on this model: max |logit error| ~1e-3 in float16, ~7e-3 in bfloat16 (logits are ~N(0, 0.2)).
@pytest.mark.parametrize("dtype, torch_dtype, atol", [("float16", torch.float16, 5e-3),
                                                      ("bfloat16", torch.bfloat16, 3e-2)])
def test_half_precision_load(ref, dtype, torch_dtype, atol):
    _, d, fp32_pipe, logits = ref
    pipe = _load(d, dtype)
    assert {p.dtype for p in pipe.model.parameters()} == {torch_dtype}
    ours, _, _ = last_logits(pipe)
    torch.testing.assert_close(ours, logits, atol=atol, rtol=0)
    other_image = last_logits(fp32_pipe, noise_image(50, 40, seed=1))[0]
    assert (other_image - logits).abs().max() > 2 * atol, "the tolerance would not notice a wrong image"


@pytest.mark.parametrize("feature_layer, built", [(-2, 2), (1, 1), (-1, 3), ([-3, -2], 2)])
def test_tower_stops_at_feature_layer(tmp_path, feature_layer, built):
    hf = build_hf_model("llava", vision=vision_config_dict(num_hidden_layers=3), vision_feature_layer=feature_layer)
    d = write_hf_checkpoint(hf, tmp_path / "tower", "hub", processor=PROCESSOR)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight" in stored
    assert "vision_tower.vision_model.post_layernorm.weight" in stored
    pipe = _load(d)
    tower = pipe.model.vision_tower
    assert len(tower.encoder.layers) == built
    names = [n for n, _ in pipe.model.named_parameters()]
    assert not any("post_layernorm" in n for n in names)
    assert not any(n.startswith(f"vision_tower.encoder.layers.{built}.") for n in names)
    logits, ids, pixels = last_logits(pipe)
    torch.testing.assert_close(logits, hf_last_logits(hf, ids, pixels), atol=1e-4, rtol=1e-4)
