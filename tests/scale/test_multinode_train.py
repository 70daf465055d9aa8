"""A two-node `llavakit train` launch, played on one machine: two torchrun agents of one process each, started
as on two nodes (`--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT`, no --standalone), train with FSDP into
one output folder (a shared file system, as multi-node runs need). Beyond tests/train/test_distributed.py (one
agent, two processes): each node's process has LOCAL_RANK 0, ranks come from the rendezvous, and only global rank
0 may write. The loss curve is the one-process curve of the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from checkpoints import build_hf_model, processor_config, write_hf_checkpoint

from llavakit.train.config import make_config
from llavakit.train.metrics import read_log
from llavakit.train.recipe import train

EXAMPLES = Path(__file__).parents[2] / "examples"
STEPS = 3


def _options(d: Path, out: Path, per_device: int) -> dict:
    return dict(model=str(d), data_path=str(EXAMPLES / "train.json"), image_folder=str(EXAMPLES / "images"),
                output_dir=str(out), per_device_train_batch_size=per_device, learning_rate=3e-3, max_steps=STEPS,
                save_steps=100, seed=0, warmup_ratio=0.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_train_as_one_process(tmp_path):
    d = write_hf_checkpoint(build_hf_model("llava", seed=5), tmp_path / "base", "hub",
                            processor=processor_config("LlavaImageProcessor", do_pad=True))
    single = [s.loss for s in train(make_config(**_options(d, tmp_path / "single", per_device=4)))]

    out = tmp_path / "two-nodes"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in _options(d, out, per_device=2).items()]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "llava-test",
              "-m", "llavakit", "train", "--distributed=fsdp", "--device=cpu", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    nodes = [subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, results, strict=True):
        assert node.returncode == 0, err[-3000:]

    losses = [r["loss"] for r in read_log(out / "train_log.jsonl")]
    assert len(losses) == STEPS  # one writer: a second node's rank would have doubled the lines
    assert max(abs(a - b) for a, b in zip(losses, single, strict=True)) < 1e-4, (losses, single)
    assert (out / "final" / "model.safetensors").is_file()
