"""Where the metrics go (--report_to tensorboard: the event file; --report_to wandb, offline: the run's history,
read back from its .wandb file) and --fp16 on the CPU (float16 autocast with loss scaling: it learns, and the
GradScaler's state is checkpointed and restored)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoints import build_hf_model, processor_config, write_hf_checkpoint
from test_recipe import make_dataset

from llavakit.cli import main
from llavakit.train import checkpoint as ckpt
from llavakit.train.config import make_config
from llavakit.train.metrics import read_log
from llavakit.train.recipe import cleanup, setup, train


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("reporters")
    d = write_hf_checkpoint(build_hf_model("llava", seed=3), root / "base", "hub",
                            processor=processor_config("LlavaImageProcessor", do_pad=True))
    return d, make_dataset(root, n=8)


def _flags(llava, out: Path) -> list[str]:
    base, data = llava
    return ["train", "--model", str(base), "--data-path", str(data), "--image-folder", str(data.parent),
            "--output-dir", str(out), "--per-device-train-batch-size", "4", "--max-steps", "2", "--learning-rate",
            "3e-3", "--logging-steps", "1"]


def test_report_to_tensorboard_writes_the_loss_scalars(llava, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main([*_flags(llava, tmp_path / "o"), "--report_to", "tensorboard"]) == 0
    logged = read_log(tmp_path / "o" / "train_log.jsonl")
    events = EventAccumulator(str(tmp_path / "o" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm"} <= set(events.Tags()["scalars"])
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in logged], rel=1e-6)  # float32 in the file
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([r["lr"] for r in logged], rel=1e-6)


def _wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: a 7-byte header (':W&B', magic, version), then LevelDB's log format
    (32 KiB blocks of chunks, each a 4-byte checksum, 2-byte length, 1-byte type: full, first, middle, last).
    wandb >= 0.19 has no Python reader of its own (its Go core writes the file)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def test_report_to_wandb_offline_keeps_the_history_on_disk(llava, tmp_path, monkeypatch):
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path / "wandb_dir",
                        "WANDB_CONFIG_DIR": tmp_path / "wandb_config", "WANDB_CACHE_DIR": tmp_path / "wandb_cache",
                        "WANDB_DATA_DIR": tmp_path / "wandb_data", "WANDB_CONSOLE": "off", "WANDB_SILENT": "true",
                        "WANDB_ERROR_REPORTING": "false", "WANDB_DISABLE_GIT": "true",
                        "WANDB_DISABLE_CODE": "true"}.items():
        monkeypatch.setenv(name, str(value))
    out = tmp_path / "o"
    assert main([*_flags(llava, out), "--report_to", "wandb", "--run_name", "tiny-run"]) == 0
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, list((out / "wandb").rglob("*"))
    records = _wandb_records(files[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("llavakit", "tiny-run")
    config = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in run.config.update}
    assert (config["learning_rate"], config["max_steps"], config["fp16"]) == (3e-3, 2, False)
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    logged = read_log(out / "train_log.jsonl")
    assert [h["_step"] for h in history] == [1, 2]
    assert [h["train/loss"] for h in history] == [r["loss"] for r in logged]
    assert [h["train/grad_norm"] for h in history] == [r["grad_norm"] for r in logged]


def _fp16_config(llava, out: Path, **kw):
    base, data = llava
    options = dict(model=str(base), data_path=str(data), image_folder=str(data.parent), output_dir=str(out),
                   per_device_train_batch_size=4, learning_rate=3e-3, max_steps=6, save_steps=100, seed=0,
                   fp16=True, report_to=["none"])
    return make_config(**(options | kw))


def test_fp16_on_the_cpu_learns(llava, tmp_path):
    history = train(_fp16_config(llava, tmp_path / "o"))
    losses = [s.loss for s in history]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 1.0, losses
    assert sum(s.grad_norm == s.grad_norm for s in history) >= 5  # at most one step skipped by the scaler


def test_fp16_checkpoints_and_restores_the_loss_scale(llava, tmp_path):
    out = tmp_path / "o"
    whole = train(_fp16_config(llava, out, save_steps=3))
    saved = torch.load(out / "checkpoint-3" / ckpt.STATE_FILE, weights_only=True)["scaler"]
    # 3 steps without an overflow so far (the scale doubles after 2000): a fresh scaler's tracker would be 0
    assert (saved["scale"], saved["_growth_tracker"]) == (2.0**16, 3), saved
    run = setup(_fp16_config(llava, out, resume_from_checkpoint=str(out / "checkpoint-3")))
    try:
        assert run.step == 3 and run.scaler.state_dict() == saved
    finally:
        cleanup(run)
    resumed = train(_fp16_config(llava, tmp_path / "r", resume_from_checkpoint=str(out / "checkpoint-3")))
    assert [s.loss for s in resumed] == [s.loss for s in whole[3:]]
