"""`llavakit generate --video` and `chat --video` as a user drives them on a tiny LLaVA-NeXT-Video checkpoint;
bad videos end in one-line errors with exit code 1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from checkpoints import build_hf_model, processor_config, write_hf_checkpoint
from conftest import noise_image
from videos import next_video_checkpoint, noise_frames, write_video

import llavakit
from llavakit.cli import main


def llavakit_cmd(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "llavakit", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=120, env=env, check=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("video-cli")
    _, d = next_video_checkpoint(root / "tiny-next-video", seed=3)
    video = write_video(root / "clip.mp4", noise_frames(8, 40, 30, seed=2))
    image = root / "cat.png"
    noise_image(40, 30, seed=5).save(image)
    return d, video, image, llavakit.load(d, dtype="float32", device="cpu", num_frames=3)


def test_generate_with_a_video_and_an_image(ckpt):
    d, video, image, pipe = ckpt
    r = llavakit_cmd("generate", "--model", d, "--video", video, "--image", image, "--video-frames", "3",
                     "--prompt", "What is it?", "--temperature", "0", "--max-new-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ref = pipe.generate("What is it?", images=[str(image)], videos=[str(video)], max_new_tokens=6)
    assert out["text"] == ref.text and out["prompt_tokens"] == len(ref.prompt_token_ids)
    assert ref.prompt_token_ids.count(pipe.config.video_token_id) == 3 * 4


def test_chat_about_a_video(ckpt):
    d, video, _, pipe = ckpt
    r = llavakit_cmd("chat", "--model", d, "--video", video, "--video-frames", "3", "--temperature", "0",
                     "--max-new-tokens", "5", stdin="What happens?\nAnd then?\n")
    assert r.returncode == 0, r.stderr
    answers = [line[len("ASSISTANT: "):] for line in r.stdout.splitlines() if line.startswith("ASSISTANT: ")]
    assert len(answers) == 2
    assert answers[0] == pipe.generate("What happens?", videos=[str(video)], max_new_tokens=5).text.strip()


@pytest.mark.parametrize("argv, message", [
    (["--video", "{d}/config.json"], r"config.json could not be read as a video; send an MP4"),
    (["--video", "{image}"], r"is a still image \(png_pipe\), not a video; pass it as an image"),
    (["--video", "/no/such/clip.mp4"], r"--video /no/such/clip.mp4: no such file"),
    (["--video", "{video}", "--conv-mode", "raw"], r"the prompt has 0 <video> tags but 1 videos were given"),
    (["--model", "{llava}", "--video", "{video}"], r"this checkpoint \(llava\) takes no videos"),
])
def test_bad_videos_are_one_line_errors(ckpt, tmp_path, capsys, argv, message):
    d, video, image, _ = ckpt
    llava = tmp_path / "llava"
    if "{llava}" in argv:
        write_hf_checkpoint(build_hf_model("llava"), llava, "hub", processor=processor_config("LlavaImageProcessor"))
    argv = [a.format(d=d, video=video, image=image, llava=llava) for a in argv]
    model = [] if "--model" in argv else ["--model", str(d)]
    assert main(["generate", *model, *argv, "--prompt", "hi", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("llavakit: error: ") and "Traceback" not in "\n".join(err)
    assert re.search(message, err[-1]), err[-1]
