"""DDP and FSDP with two gloo processes (torchrun) reproduce the one-process loss curve for the same
global batch: per-step losses agree within 1e-4 (fp32; only the summation order differs)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from checkpoints import build_hf_model, processor_config, write_hf_checkpoint
from test_recipe import make_dataset

from llavakit.train.config import make_config
from llavakit.train.metrics import read_log
from llavakit.train.recipe import train

STEPS = 6
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    d = write_hf_checkpoint(build_hf_model("llava", seed=5), root / "base", "hub",
                            processor=processor_config("LlavaImageProcessor", do_pad=True))
    return root, d, make_dataset(root, n=16)


def _options(d, data, out, per_device, accum=1):
    return dict(model=str(d), data_path=str(data), image_folder=str(data.parent), output_dir=str(out),
                per_device_train_batch_size=per_device, gradient_accumulation_steps=accum, learning_rate=3e-3,
                max_steps=STEPS, save_steps=100, seed=0, warmup_ratio=0.0)


@pytest.fixture(scope="module")
def single(setup_dirs):
    root, d, data = setup_dirs
    return [s.loss for s in train(make_config(**_options(d, data, root / "single", per_device=4)))]


def test_gradient_accumulation_matches_one_big_batch(setup_dirs, single):
    root, d, data = setup_dirs
    accum = [s.loss for s in train(make_config(**_options(d, data, root / "accum", per_device=2, accum=2)))]
    assert max(abs(a - b) for a, b in zip(accum, single, strict=True)) < TOLERANCE


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(setup_dirs, single, mode):
    root, d, data = setup_dirs
    out = root / mode
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in _options(d, data, out, per_device=2).items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "llavakit", "train", f"--distributed={mode}", "--device=cpu", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [r["loss"] for r in read_log(out / "train_log.jsonl")]
    assert len(losses) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, single, strict=True)) < TOLERANCE, (losses, single)
    assert (out / "final" / "model.safetensors").is_file()
