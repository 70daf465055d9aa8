"""`llavakit random-checkpoint`: tiny llava-hf checkpoints that transformers loads and agrees with."""

import pytest
import torch
from conftest import noise_image
from parity import assert_parity

import llavakit
from llavakit.cli import main


@pytest.mark.parametrize("preset", ["tiny", "tiny-next"])
def test_a_random_checkpoint_is_a_checkpoint_transformers_agrees_with(tmp_path, preset):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / preset
    assert main(["random-checkpoint", "--preset", preset, "--out", str(out)]) == 0
    pipe = llavakit.load(out, dtype="float32", device="cpu")
    assert pipe.config.model_type == {"tiny": "llava", "tiny-next": "llava_next"}[preset]
    hf = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    assert_parity(pipe, hf, AutoProcessor.from_pretrained(out), [noise_image(45, 30)])


def test_it_never_writes_over_a_directory_with_files(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["random-checkpoint", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--out" in err[0]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
