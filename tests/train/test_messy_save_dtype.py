"""Checkpoints keep the dtype of the model training started from (a float16 checkpoint is not written back as
float32, twice the size) unless --save-dtype says otherwise; resuming from a rounded checkpoint still goes on from
the exact weights."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import build_hf_model, processor_config, write_hf_checkpoint
from safetensors import safe_open
from test_recipe import config, make_dataset

import llavakit
from llavakit.train import checkpoint as ckpt
from llavakit.train.lora import NON_LORA_FILE
from llavakit.train.recipe import train


@pytest.fixture(scope="module")
def fp16_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    d = write_hf_checkpoint(build_hf_model("llava", seed=3).half(), root / "base", "hub",
                            processor=processor_config("LlavaImageProcessor", do_pad=True))
    return d, make_dataset(root)


def _dtypes(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def test_finetuning_a_float16_checkpoint_saves_float16(fp16_base, tmp_path):
    assert _dtypes(fp16_base[0] / "model.safetensors") == {"F16"}
    train(config(fp16_base, tmp_path, max_steps=2, save_steps=1))
    for directory in (tmp_path / "checkpoint-1", tmp_path / "final"):
        assert _dtypes(directory / "model.safetensors") == {"F16"}
        assert json.loads((directory / "config.json").read_text())["torch_dtype"] == "float16"
    trained = llavakit.load(tmp_path / "final", dtype="float32", device="cpu").model.state_dict()
    base = llavakit.load(fp16_base[0], dtype="float32", device="cpu").model.state_dict()
    assert (trained["projector.0.weight"] - base["projector.0.weight"]).abs().max() > 1e-3  # it did train


def test_save_dtype_overrides_the_checkpoints_dtype(fp16_base, tmp_path):
    train(config(fp16_base, tmp_path / "f32", max_steps=1, save_dtype="float32"))
    assert _dtypes(tmp_path / "f32" / "final" / "model.safetensors") == {"F32"}
    train(config(fp16_base, tmp_path / "bf16", max_steps=1, save_dtype="bfloat16"))
    assert _dtypes(tmp_path / "bf16" / "final" / "model.safetensors") == {"BF16"}


def test_lora_on_a_float16_checkpoint_saves_float16(fp16_base, tmp_path):
    train(config(fp16_base, tmp_path, stage="lora", lora_r=4, lora_alpha=8, max_steps=1))
    assert _dtypes(tmp_path / "final" / "adapter_model.safetensors") == {"F16"}
    assert _dtypes(tmp_path / "final" / NON_LORA_FILE) == {"F16"}


def test_resume_from_a_float16_checkpoint_is_exact(fp16_base, tmp_path):
    straight = [s.loss for s in train(config(fp16_base, tmp_path / "a", max_steps=4, save_steps=2))]

    def crash(info):
        if info.step == 2:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train(config(fp16_base, tmp_path / "b", max_steps=4, save_steps=2), callbacks=[crash])
    assert _dtypes(tmp_path / "b" / "checkpoint-2" / "model.safetensors") == {"F16"}
    resumed = train(config(fp16_base, tmp_path / "b", max_steps=4, save_steps=2, resume_from_checkpoint="latest"))
    assert [s.loss for s in resumed] == straight[2:]  # the float32 weights came back, not their float16 rounding


def test_weights_dtype_reads_the_most_common_float_dtype(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2, dtype=torch.bfloat16), "b": torch.zeros(2, dtype=torch.bfloat16),
               "c": torch.zeros(2), "ids": torch.zeros(2, dtype=torch.int64)}, tmp_path / "model.safetensors")
    assert ckpt.weights_dtype(tmp_path) == torch.bfloat16
