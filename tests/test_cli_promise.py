"""The CLI's promise (llavakit/cli/__init__.py) in the cases that used to break it: exit 0 ok, 2 usage error,
1 runtime error with ONE line on stderr that names what is wrong (the file and line, the flag); what can be
checked without a model is refused before any model loads; safe defaults; help that says what it does."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import noise_image

import llavakit
from llavakit.cli import build_parser, error_line, main, serve

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
ROW = {"id": "0", "image": "img0.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                         {"from": "gpt", "value": "A shape."}]}


def run_cli(argv: list[str]) -> int:
    """main's exit code, argparse's usage errors (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: these errors must come before any load."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(llavakit, "load", refuse)
    monkeypatch.setattr("llavakit.pipeline.load", refuse)
    monkeypatch.setattr("llavakit.train.recipe._model", refuse)
    monkeypatch.setattr("llavakit.train.merge.merge_lora_checkpoint", refuse)


@pytest.fixture
def files(tmp_path) -> Path:
    """Inputs good and bad: training rows whose image is not there, answers and annotation files, a scene."""
    (tmp_path / "data.json").write_text(json.dumps([ROW, {**ROW, "id": "1", "image": "img1.png"}]))
    (tmp_path / "ans.jsonl").write_text('{"question_id": 1, "text": "two"}\n')
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1, "text": "two"}\nnot json\n')
    (tmp_path / "ann.jsonl").write_text('{"question_id": 1, "answer": "2"}\n')
    (tmp_path / "vqa.json").write_text(json.dumps({"annotations": [{"question_id": 1}]}))
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "text": "How many?"}\n')
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "checkpoint-500").mkdir()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "list.yaml").write_text("- stage\n- lora\n")
    (tmp_path / "a-file").write_text("")
    noise_image(40, 30).save(tmp_path / "scene.png")
    return tmp_path


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


TRAIN = ["train", "--model", "demo", "--data-path", "{t}/data.json", "--max-steps", "1"]
SCORE = ["eval", "score", "--task", "vqav2", "--answers", "{t}/ans.jsonl"]
GENERATE = ["generate", "--prompt", "hi", "--image", "{t}/scene.png"]

# (argv, exit code, what the last stderr line must say); {t}: the files' folder, {port}: a port in use.
CASES = [
    # 1. training images that are not there: said before the model loads, with where they were looked for
    pytest.param(TRAIN + ["--output-dir", "{t}/o"], 1, r"2 of 2 rows.*not found: img0\.png.*no image_folder "
                 r"\(--image-folder\) is set.*current directory", id="train-no-image-folder"),
    pytest.param(TRAIN + ["--output-dir", "{t}/o", "--image-folder", "{t}/imgs"], 1,
                 r"not found: \S*/imgs/img0\.png.*--image-folder\) \S*/imgs", id="train-wrong-image-folder"),
    # 2. a port in use: one line before the model loads
    pytest.param(["serve", "--port", "{port}"], 1, r"^llavakit: error: port {port} on 127\.0\.0\.1 is in use; "
                 r"pick another with --port$", id="serve-busy-port"),
    pytest.param(["serve", "--port", "70000"], 2, r"argument --port: must be in \[0, 65535\]", id="serve-bad-port"),
    # 3. an unknown task is a usage error
    pytest.param(["eval", "score", "--task", "nosuchtask", "--answers", "a", "--annotations", "b"], 2,
                 r"argument --task: invalid choice: 'nosuchtask'", id="eval-unknown-task"),
    # 4. files: the file, the line, what was expected; never a bare KeyError, JSON or errno message
    pytest.param(SCORE + ["--annotations", "{t}/ann.jsonl"], 1, r"ann\.jsonl:1 has no 'answers' key \(it has "
                 r"'question_id', 'answer'\); expected a VQAv2", id="annotations-missing-key"),
    pytest.param(SCORE + ["--annotations", "{t}/vqa.json"], 1,
                 r"vqa\.json: 'annotations', item 0 has no 'answers' key", id="annotations-json-missing-key"),
    pytest.param(["eval", "score", "--task", "gqa", "--answers", "{t}/bad.jsonl", "--annotations", "{t}/ann.jsonl"],
                 1, r"bad\.jsonl:2 is not valid JSON .*expected llavakit predict's answers", id="answers-not-json"),
    pytest.param(["eval", "score", "--task", "gqa", "--answers", "{t}/none.jsonl", "--annotations", "{t}/a"],
                 1, r"none\.jsonl does not exist; expected llavakit predict's answers", id="answers-missing"),
    pytest.param(["eval", "score", "--task", "gqa", "--answers", "{t}/ans.jsonl", "--annotations", "{t}"],
                 1, r"is a directory; expected a file: GQA's", id="annotations-directory"),
    pytest.param(["predict", "--model", "demo", "--questions", "{t}/q.jsonl", "--answers", "{t}/bad.jsonl"], 1,
                 r"bad\.jsonl:2 is not valid JSON.*--answers", id="predict-corrupt-answers"),
    pytest.param(["train", "{t}/list.yaml", "--model", "demo", "--data-path", "{t}/data.json"], 1,
                 r"list\.yaml must hold a mapping of option names", id="train-config-not-a-mapping"),
    pytest.param(["train", "--model", "demo", "--data-path", "{t}/none.json"], 1,
                 r"none\.json does not exist; expected LLaVA training data \(data_path / --data-path\)",
                 id="train-data-missing"),
    pytest.param(["merge-lora", "--base", "demo", "--lora", "{t}/adapter", "--out", "{t}/a-file"], 1,
                 r"--out \S*a-file is a file; pass a directory", id="merge-lora-out-is-a-file"),
    # 7. inputs checked before the model loads: images, sampling values, output paths
    pytest.param(["generate", "--prompt", "hi", "--image", "{t}/none.png"], 1, r"--image \S*none\.png: no such file",
                 id="generate-missing-image"),
    pytest.param(["chat", "--image", "{t}/notes.txt"], 1, r"notes\.txt could not be decoded", id="chat-bad-image"),
    pytest.param(["ground", "--image", "{t}/none.png", "--query", "Where?"], 1, r"--image \S*none\.png",
                 id="ground-missing-image"),
    pytest.param(GENERATE + ["--temperature", "-1"], 2, r"argument --temperature: must be >= 0", id="temperature"),
    pytest.param(GENERATE + ["--top-p", "0"], 2, r"argument --top-p: must be in \(0, 1\], got 0", id="top-p"),
    pytest.param(GENERATE + ["--top-k", "-1"], 2, r"argument --top-k: must be >= 0", id="top-k"),
    pytest.param(GENERATE + ["--video-frames", "0"], 2, r"argument --video-frames: must be >= 1", id="video-frames"),
    pytest.param(GENERATE + ["--max-new-tokens", "0"], 2, r"argument --max-new-tokens/--max-tokens: must be >= 1",
                 id="max-new-tokens"),
    pytest.param(["ground", "--image", "{t}/scene.png", "--query", "Where?", "--out", "{t}/no/dir/x.png"], 1,
                 r"--out \S*x\.png: the folder \S*/no/dir does not exist", id="ground-out-folder-missing"),
    pytest.param(["predict", "--model", "demo", "--questions", "{t}/q.jsonl", "--answers", "{t}/a-file/a.jsonl"],
                 1, r"--answers \S*a-file/a\.jsonl: the folder \S*a-file is not a directory", id="predict-answers"),
    pytest.param(SCORE + ["--annotations", "{t}/ann.jsonl", "--out", "{t}/no/r.json"], 1,
                 r"--out \S*r\.json: the folder \S*/no does not exist", id="eval-out-folder-missing"),
    # 8. the hours-long recipe does not start by default
    pytest.param(["demo", "train"], 2, r"runs for hours.*pass --workdir DIR", id="demo-train-needs-workdir"),
    # 9. a non-empty output directory is refused unless told, and --overwrite-output-dir / --resume pass
    pytest.param(TRAIN + ["--output-dir", "{t}/full"], 1, r"--output-dir \S*full is not empty \(checkpoint-500\); "
                 r"pass --resume .*--overwrite-output-dir", id="train-output-dir-not-empty"),
    pytest.param(TRAIN + ["--output-dir", "{t}/full", "--overwrite-output-dir"], 1, r"rows name image files that "
                 "do not exist", id="train-overwrite-output-dir"),
    pytest.param(TRAIN + ["--output-dir", "{t}/full", "--resume"], 1, r"rows name image files that do not exist",
                 id="train-resume"),
]


@pytest.mark.parametrize("argv, code, message", CASES)
def test_cli_promise(argv, code, message, files, busy_port, no_model, capsys):
    argv = [a.format(t=files, port=busy_port) for a in argv]
    assert run_cli(argv) == code
    err = capsys.readouterr().err.splitlines()
    assert "Traceback" not in "\n".join(err)
    if err[0].startswith("usage: llavakit "):  # argparse: the usage, then one error line naming the flag
        assert code == 2 and re.match(r"llavakit [\w -]+: error: argument ", err[-1]), err
    else:  # one line, and no model was loaded before it
        assert len(err) == 1 and err[0].startswith("llavakit: error: "), err
    if message:
        assert re.search(message.format(port=busy_port), err[-1]), err[-1]


def test_library_words_are_said_as_flags_in_the_cli(capsys, monkeypatch):
    """5. A message in keyword terms (device='cpu') also names the flag when the CLI shows it."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["generate", "--device", "cuda", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("llavakit: error: device 'cuda'") and "(CLI: --device cpu)" in err[-1]


def test_a_key_error_is_never_a_bare_key():
    """4. The last line of defence: a KeyError that escapes says which key is missing."""
    assert error_line(KeyError("answers")) == "missing key 'answers'"
    assert error_line(ValueError("first line\nsecond")) == "first line"


def test_piped_chat_survives_a_bad_image(files, monkeypatch, capsys):
    """10. Piped like at a terminal: a bad /image prints its error and the chat goes on."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"Hi\n/image {files}/none.png\nAnd now?\n"))
    assert main(["chat", "--image", str(files / "scene.png"), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert out.out.count("ASSISTANT: ") == 2
    errors = [line for line in out.err.splitlines() if line.startswith("llavakit: error:")]
    assert len(errors) == 1 and "none.png" in errors[0]


class _NoBoxPipe:
    """Answers without a box, as a model asked something it cannot locate."""

    def generate(self, prompt, images, **kwargs):
        return type("Out", (), {"text": "I cannot tell where it is."})()


def test_ground_without_a_box_is_an_error(files, monkeypatch, capsys):
    """11. No box in the answer: exit 1, one line saying so, no PNG."""
    monkeypatch.setattr("llavakit.cli.ground.load_pipeline", lambda args: _NoBoxPipe())
    out = files / "boxes.png"
    assert main(["ground", "--image", str(files / "scene.png"), "--query", "Where?", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == "I cannot tell where it is."
    assert captured.err.splitlines() == [f"llavakit: error: no box found: the answer 'I cannot tell where it is.' has "
                                         f"no [x1, y1, x2, y2]; nothing was drawn and {out} was not written (ask "
                                         "where something is, e.g. --query 'Where is the bus?')"]
    assert not out.exists()


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_shows_defaults(capsys):
    """13. Defaults in --help, on serve and on the other subcommands."""
    text = " ".join(_help(["serve"], capsys).split())
    assert "TCP port (0: any free one) (default: 8000)" in text and "(default: 127.0.0.1)" in text
    assert "(default: 64)" in text and "(default: info)" in text
    assert "tokens to generate at most (default: 64)" in " ".join(_help(["ground"], capsys).split())
    assert "(default: None)" not in text and "(default: False)" not in text


def test_each_demo_action_has_its_own_help(capsys):
    """14. demo train, eval, scene and export: their own flags and descriptions."""
    train, scene = _help(["demo", "train"], capsys), _help(["demo", "scene"], capsys)
    assert "--workdir" in train and "--resume" in train and "--any-canvas" not in train and "--seed" not in train
    assert "--seed" in scene and "--workdir" not in scene and "draw one synthetic scene" in scene
    assert "--any-canvas" in _help(["demo", "eval"], capsys)
    assert "as a benchmark" in _help(["demo", "export"], capsys)


def test_train_help_lists_stages_and_explains_every_option(capsys):
    """15. --stage choices listed, and every option has a help string that says what it does."""
    text = " ".join(_help(["train"], capsys).split())
    assert "--stage {pretrain,finetune,lora}" in text and "only the projector trains" in text
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        assert action.help == argparse.SUPPRESS or len(action.help or "") > 20, action.option_strings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_help_example_works_and_each_request_is_logged(tmp_path):
    """12 and 16. The request in `serve --help` names the model the server in the example answers to; run
    against a real server (the built-in model standing in for the example's), it succeeds, and the server logs
    one line for it: request id (also in X-Request-Id), route, status, tokens, latency."""
    example = serve.EXAMPLE.replace("\\\n", " ")
    command = shlex.split(next(line for line in example.splitlines() if "llavakit serve" in line))[2:]
    body = json.loads(re.search(r"-d '(\{.*?\})'", example).group(1))
    model = command[command.index("--model") + 1]
    assert body["model"] == model  # the example's request is for the model its server serves
    port = _free_port()
    command[command.index("--model") + 1] = "demo"
    command[command.index("--port") + 1] = str(port)
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "llavakit", "serve", *command], stderr=err, env=ENV,
                                stdout=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(url + "/v1/chat/completions", json={**body, "model": "demo", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
        request_id, usage = r.headers["x-request-id"], r.json()["usage"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    lines = [line for line in log.read_text().splitlines() if request_id in line]
    assert len(lines) == 1, log.read_text()
    assert re.fullmatch(rf"INFO: +{request_id} POST /v1/chat/completions 200 prompt_tokens={usage['prompt_tokens']} "
                        rf"completion_tokens={usage['completion_tokens']} [\d.]+ ms", lines[0]), lines[0]
    assert "GET /health" not in log.read_text()  # probes are logged at debug only
