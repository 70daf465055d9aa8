"""--tensor-parallel-size on the command line: under torchrun (every rank runs the command, ranks above 0 follow
rank 0 and print nothing) the demo model answers as in one process; sizes that cannot work are one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import llavakit
from llavakit.cli import main
from llavakit.parallel.workers import check_devices

IMAGE = "examples/images/shapes.png"
ASK = ["generate", "--image", IMAGE, "--prompt", "What color is the circle?", "--temperature", "0", "--device", "cpu"]


def test_torchrun_ranks_answer_as_one_process():
    expected = llavakit.load("demo", dtype="float32", device="cpu").generate(
        "What color is the circle?", images=[IMAGE], temperature=0).text
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = subprocess.run([*torchrun, "-m", "llavakit", *ASK, "--tensor-parallel-size", "2"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == expected.strip()  # printed once: by rank 0


def test_torchrun_size_must_match():
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "llavakit", *ASK, "--tensor-parallel-size", "4"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert "torchrun started 2 processes but the tensor-parallel size is 4; pass --tensor-parallel-size 2" in out.stderr


def test_a_size_the_heads_do_not_divide_is_refused_before_any_worker_starts(capsys):
    assert main([*ASK, "--tensor-parallel-size", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("llavakit: error: ") and "do not split evenly over 3 ranks" in err[-1]


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="tensor-parallel size 4 needs 4 GPUs but 2 are visible"):
        check_devices(4, torch.device("cuda"))
    check_devices(2, torch.device("cuda"))
    check_devices(8, torch.device("cpu"))  # CPU ranks are processes


def test_the_flag_needs_a_positive_whole_number():
    with pytest.raises(SystemExit) as e:
        main([*ASK, "--tensor-parallel-size", "0"])
    assert e.value.code == 2



def test_bench_against_transformers_stays_on_one_device(capsys):
    args = ["bench", "--model", "bench-small", "--load-format", "dummy", "--compare-transformers"]
    assert main([*args, "--tensor-parallel-size", "2"]) == 2
    assert "drop --tensor-parallel-size" in capsys.readouterr().err
