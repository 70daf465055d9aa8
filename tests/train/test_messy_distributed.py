"""FSDP on messy data: image and text-only rows mixed, and a bad row, at batch 1 x 2 accumulation steps, so
one rank's micro-batch often has an image while the other's has none or no row at all. Every rank must run the
same collectives; two gloo processes then reproduce the one-process losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from checkpoints import build_hf_model, processor_config, write_hf_checkpoint
from test_recipe import make_dataset

import llavakit
from llavakit.config import IGNORE_INDEX
from llavakit.train.config import make_config
from llavakit.train.data import ModalityGroupedBatches
from llavakit.train.metrics import read_log
from llavakit.train.recipe import LossModule, train

ROWS, BAD_ROW, STEPS, SEED = 16, 6, 4, 0


def _messy_dataset(root):
    """Odd rows text-only, one row malformed."""
    data = make_dataset(root, n=ROWS)
    rows = json.loads(data.read_text())
    for row in rows[1::2]:
        del row["image"]
        row["conversations"][0]["value"] = "What color do you like?"
    rows[BAD_ROW]["conversations"] = "not a list"
    data.write_text(json.dumps(rows))
    return data, rows


def _options(d, data, out, **kw):
    return dict(model=str(d), data_path=str(data), image_folder=str(data.parent), output_dir=str(out),
                learning_rate=3e-3, max_steps=STEPS, save_steps=100, seed=SEED, warmup_ratio=0.0,
                max_bad_fraction=0.1, **kw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_hf_checkpoint(build_hf_model("llava", seed=5), tmp_path_factory.mktemp("messy") / "base", "hub",
                               processor=processor_config("LlavaImageProcessor", do_pad=True))


@pytest.mark.parametrize("rows", [0, 1])
def test_a_batch_without_images_can_run_the_tower_on_a_blank_image_at_no_cost(checkpoint, rows):
    # rows 0: a rank whose rows were all skipped; it still takes part, with a zero loss reaching every weight.
    model = llavakit.load(checkpoint, dtype="float32", device="cpu").model.requires_grad_(True)
    ids = torch.tensor([[1, 450, 2927, 338]])[:rows]
    labels = torch.tensor([[IGNORE_INDEX, 450, 2927, 338]])[:rows]
    plain, tokens = LossModule(model)(ids, labels, [], [])
    blank, same_tokens = LossModule(model)(ids, labels, [], [], blank_image=True)
    assert float(blank.detach()) == float(plain.detach()) and int(tokens) == int(same_tokens) == 3 * rows
    blank.backward()
    assert all(p.grad is not None for p in model.parameters())  # the tower and projector ran, adding nothing
    assert all(float(p.grad.abs().max()) == 0 for n, p in model.named_parameters() if n.startswith("vision_tower."))


def test_fsdp_on_mixed_image_text_and_bad_rows_matches_one_process(checkpoint, tmp_path):
    d = checkpoint
    data, rows = _messy_dataset(tmp_path)
    # The case under test must occur: in some micro-step one rank gets an image row and the other a text row,
    # and in one rank 1 gets only the bad row (global batch 4 = rows of rank 0, 1 in micro-step 1, then 0, 1).
    kinds = ["bad" if i == BAD_ROW else "image" if "image" in rows[i] else "text" for i in range(ROWS)]
    batches = ModalityGroupedBatches(ROWS, kinds, 4, SEED, False, drop_last=True).batches(0)[:STEPS]
    pairs = [{kinds[b[k]], kinds[b[k + 1]]} for b in batches for k in (0, 2)]
    assert {"image", "text"} in pairs and [b.index(BAD_ROW) % 2 for b in batches if BAD_ROW in b] == [1], batches

    single = [s.loss for s in train(make_config(**_options(d, data, tmp_path / "single",
                                                           per_device_train_batch_size=4)))]
    out = tmp_path / "fsdp"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in _options(d, data, out, per_device_train_batch_size=1,
                                                                 gradient_accumulation_steps=2).items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "llavakit", "train", "--distributed=fsdp", "--device=cpu", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [r["loss"] for r in read_log(out / "train_log.jsonl")]
    assert len(losses) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, single, strict=True)) < 1e-4, (losses, single)
    assert result.stdout.count(f"skipped row {BAD_ROW}:") == 1  # reported once, by rank 0, though rank 1 read it
