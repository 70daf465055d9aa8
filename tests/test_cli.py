"""`llavakit` driven as a user drives it: subprocesses on a tiny checkpoint, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoints import build_hf_model, processor_config, write_hf_checkpoint
from conftest import noise_image

import llavakit
from llavakit.cli import SUBCOMMANDS, main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def llavakit_cmd(*args, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llavakit", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    d = write_hf_checkpoint(build_hf_model("llava", seed=9), root / "tiny-llava", "hub",
                            processor=processor_config("LlavaImageProcessor", do_pad=True))
    img = root / "cat.png"
    noise_image(40, 30, seed=5).save(img)
    return d, img, llavakit.load(d, dtype="float32", device="cpu")


def test_generate_json(ckpt):
    d, img, pipe = ckpt
    r = llavakit_cmd("generate", "--model", d, "--image", img, "--prompt", "What is it?", "--temperature", "0",
                     "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ref = pipe.generate("What is it?", images=[str(img)], max_new_tokens=8)
    assert out["text"] == ref.text and out["completion_tokens"] == 8
    assert out["prompt_tokens"] == len(ref.prompt_token_ids)
    assert set(out["timings_ms"]) == {"load", "preprocess", "vision", "prefill", "decode"}
    assert out["decode_tokens_per_second"] > 0


def test_piped_chat_keeps_the_conversation(ckpt, tmp_path):
    d, img, pipe = ckpt
    save = tmp_path / "conv.json"
    r = llavakit_cmd("chat", "--model", d, "--image", img, "--temperature", "0", "--max-new-tokens", "6",
                     stdin=f"What is it?\nAnd the colour?\n/save {save}\n")
    assert r.returncode == 0, r.stderr
    answers = [line[len("ASSISTANT: "):] for line in r.stdout.splitlines() if line.startswith("ASSISTANT: ")]
    assert len(answers) == 2
    first = pipe.generate("What is it?", images=[str(img)], max_new_tokens=6).text.strip()
    assert answers[0] == first
    history = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "And the colour?"}]
    in_context = pipe.chat(history, images=[str(img)], max_new_tokens=6).text.strip()
    alone = pipe.generate("And the colour?", images=[str(img)], max_new_tokens=6).text.strip()
    assert answers[1] == in_context and in_context != alone
    saved = json.loads(save.read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant", "user", "assistant"]


def test_chat_image_and_reset_commands(ckpt, tmp_path):
    d, img, pipe = ckpt
    other = tmp_path / "dog.png"
    noise_image(30, 50, seed=6).save(other)
    r = llavakit_cmd("chat", "--model", d, "--image", img, "--temperature", "0", "--max-new-tokens", "5",
                     stdin=f"Hi\n/image {other}\nHi\n/reset\nHi\n")
    assert r.returncode == 0, r.stderr
    answers = [line[len("ASSISTANT: "):] for line in r.stdout.splitlines() if line.startswith("ASSISTANT: ")]
    on_other = pipe.generate("Hi", images=[str(other)], max_new_tokens=5).text.strip()
    assert answers[1] == on_other and answers[2] == on_other  # /reset keeps the new image, drops history
    assert "new conversation" in r.stderr and "conversation reset" in r.stderr


def test_prompt_shows_template_and_ids(ckpt):
    d, img, pipe = ckpt
    r = llavakit_cmd("prompt", "--model", d, "--image", img, "What is it?")
    assert r.returncode == 0, r.stderr
    assert "template: vicuna_v1" in r.stdout and "USER: <image>\nWhat is it? ASSISTANT:" in r.stdout
    assert str(pipe.tokenize("What is it?", images=[str(img)])) in r.stdout
    assert "[<image> x4]" in r.stdout


def _questions(path: Path, img_name: str, n: int) -> None:
    rows = [json.dumps({"question_id": i, "image": img_name, "text": f"Question {i}?"}) for i in range(n)]
    rows.insert(3, "{not json")
    rows.insert(5, json.dumps({"question_id": "nofile", "image": "missing.png", "text": "Where?"}))
    path.write_text("\n".join(rows) + "\n")


def test_predict_resumes_to_the_same_file(ckpt, tmp_path):
    d, img, _ = ckpt
    q = tmp_path / "q.jsonl"
    _questions(q, img.name, 40)
    common = ["predict", "--model", d, "--questions", q, "--image-folder", img.parent, "--max-new-tokens", "12"]
    full = tmp_path / "full.jsonl"
    r = llavakit_cmd(*common, "--answers", full)
    assert r.returncode == 0, r.stderr
    assert "skipped 2" in r.stderr and "missing.png" in r.stderr and "not valid JSON" in r.stderr
    assert len(full.read_text().splitlines()) == 40

    part = tmp_path / "part.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "llavakit", *map(str, common), "--answers", str(part)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not part.exists() or len(part.read_text().splitlines()) < 5):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    written = part.read_bytes()
    assert 5 <= written.count(b"\n") < 40  # really interrupted
    part.write_bytes(written + b'{"question_id": 99, "pro')  # and cut mid-line, as a kill can leave it
    r = llavakit_cmd(*common, "--answers", part)
    assert r.returncode == 0, r.stderr
    assert part.read_text() == full.read_text()


def test_predict_chunks_cover_the_questions(ckpt, tmp_path):
    d, img, _ = ckpt
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "text": f"Q{i}"}) + "\n" for i in range(5)))
    ids = []
    for k in range(2):
        a = tmp_path / f"a{k}.jsonl"
        assert main(["predict", "--model", str(d), "--questions", str(q), "--answers", str(a),
                     "--num-chunks", "2", "--chunk-idx", str(k), "--max-new-tokens", "2"]) == 0
        ids += [json.loads(line)["question_id"] for line in a.read_text().splitlines()]
    assert ids == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/no/such/dir", "--prompt", "hi"], "is not a directory and not a hub id"),
    (["generate", "--model", "no-org/no-model", "--prompt", "hi"], "hf download no-org/no-model"),
    (["generate", "--model", "{d}", "--image", "{d}/config.json", "--prompt", "hi"], "could not be decoded"),
    (["generate", "--model", "{d}", "--image", "/no/such.png", "--prompt", "hi"], "/no/such.png"),
    (["generate", "--model", "{d}", "--image", "file:///etc/passwd", "--prompt", "hi"],
     "scheme .file. is not supported"),
    (["generate", "--model", "{d}", "--conv-mode", "nonsense", "--prompt", "hi"], "unknown.*nonsense|nonsense.*known"),
    (["generate", "--model", "{d}", "--conv-mode", "raw", "--image", "{img}", "--prompt", "no tag"], "0 <image> tags"),
    (["predict", "--model", "{d}", "--questions", "/no/q.jsonl", "--answers", "{tmp}/a.jsonl"], "does not exist"),
    (["predict", "--model", "{d}", "--questions", "{d}/config.json", "--answers", "{tmp}/a.jsonl", "--num-chunks",
      "2", "--chunk-idx", "5"], "--chunk-idx must be in"),
])
def test_runtime_errors_are_one_line_exit_1(ckpt, tmp_path, capsys, monkeypatch, argv, message):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    d, img, _ = ckpt
    argv = [a.format(d=d, img=img, tmp=tmp_path) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("llavakit: error: ") and "Traceback" not in "\n".join(err)
    assert re.search(message, err[-1]), err[-1]


@pytest.mark.parametrize("argv", [["generate", "--model", "x"], ["frobnicate"], ["predict", "--model", "x"],
                                  ["generate", "--model", "x", "--prompt", "p", "--temperature", "hot"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "usage:" in capsys.readouterr().err


def test_debug_shows_the_traceback(ckpt):
    with pytest.raises(ValueError):
        main(["--debug", "generate", "--model", "/no/such/dir", "--prompt", "hi"])


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help_reads_well_and_has_examples(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(([command] if command else []) + ["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "examples:" in out and "llavakit " in out


def test_predict_benchmark_suffix(ckpt, tmp_path):
    d, img, pipe = ckpt
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "image": img.name, "text": "What is it?"}) + "\n")
    a = tmp_path / "a.jsonl"
    assert main(["predict", "--model", str(d), "--questions", str(q), "--image-folder", str(img.parent),
                 "--answers", str(a), "--benchmark", "vqav2", "--max-new-tokens", "4"]) == 0
    row = json.loads(a.read_text())
    ref = pipe.generate("What is it?\nAnswer the question using a single word or phrase.", images=[str(img)],
                        max_new_tokens=4)
    assert row["text"] == ref.text.strip() and row["prompt"] == "What is it?"


def test_no_model_means_the_demo_model(tmp_path, capsys, monkeypatch):
    import llavakit.weights.hub as hub

    monkeypatch.setattr(hub, "DEMO_MODEL", tmp_path / "no-demo-here")
    assert main(["generate", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "demo model is not installed" in err and "--model" in err


@pytest.mark.parametrize("command", [["chat"], ["generate"], ["prompt"], ["predict"], ["ground"], ["serve"], ["bench"],
                                     ["train"], ["merge-lora"], ["demo", "train"], ["demo", "eval"],
                                     ["eval", "clip-score"], ["eval", "compare"]])
def test_every_model_loading_command_takes_threads(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0 and "--threads N" in capsys.readouterr().out
