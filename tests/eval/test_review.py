"""`llavakit eval review` against a local OpenAI-compatible judge on 127.0.0.1 that records every request and
answers as each test scripts it: scores, malformed replies, rate limits, slow replies, refusals."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llavakit.cli import main
from llavakit.eval.review import SYSTEM_MESSAGE, JudgeClient, context_text, parse_score

RULES = {
    "conv": {"role": "Assistant", "prompt": "Rate the conversation answers. RULE-CONV"},
    "detail": {"role": "Assistant", "prompt": "Rate the detailed descriptions. RULE-DETAIL"},
    "llava_bench_conv": {"role": "Assistant", "prompt": "Rate them, in-the-wild. RULE-BENCH-CONV"},
}
QUESTIONS = [
    {"question_id": 0, "image": "a.jpg", "text": "What colour is the bus?", "category": "conv"},
    {"question_id": 1, "image": "a.jpg", "text": "Describe the image in detail.", "category": "detail"},
    {"question_id": 2, "image": "b.jpg", "text": "How many dogs are there?", "category": "conv"},
    {"question_id": 3, "image": "b.jpg", "text": "What is the dog holding?", "category": "conv"},
]
CONTEXTS = [
    {"id": "a", "image": "a.jpg", "captions": ["A red bus on a street.", "A bus parked by a kerb."],
     "instances": [{"category": "bus", "bbox": [0.1, 0.2, 0.9, 0.8]},
                   {"category": "person", "bbox": [0.5, 0.5, 0.6, 0.9]}]},
    {"id": "b", "image": "b.jpg", "captions": ["Two dogs play with a ball."],
     "instances": [{"category": "dog", "bbox": [0.0, 0.1, 0.4, 0.9]}]},
]
REFERENCE = [{"question_id": q["question_id"], "text": f"reference answer {q['question_id']}",
              "category": q["category"]} for q in QUESTIONS]
ANSWERS = [{"question_id": q["question_id"], "prompt": q["text"], "text": f"model answer {q['question_id']}",
            "answer_id": f"ans-{q['question_id']}", "model_id": "m"} for q in QUESTIONS]


class Judge:
    """A judge server: `script[question text]` lists what to do on each successive ask of that question: a
    reply text, an HTTP status (int), or ("slow", seconds, reply)."""

    def __init__(self, script: dict[str, list]):
        self.script, self.requests, self.lock = script, [], threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    question = judge.question_of(body)
                    asked = sum(judge.question_of(r["body"]) == question for r in judge.requests)
                steps = judge.script[question]
                judge.respond(self, steps[min(asked, len(steps)) - 1])

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    @staticmethod
    def question_of(body: dict) -> str:
        return body["messages"][1]["content"].split("[Question]\n", 1)[1].split("\n", 1)[0]

    @staticmethod
    def respond(handler: BaseHTTPRequestHandler, step) -> None:
        if isinstance(step, tuple):
            time.sleep(step[1])
            step = step[2]
        if isinstance(step, int):
            payload, status = {"error": {"message": f"status {step} from the test judge"}}, step
        else:
            payload, status = {"choices": [{"message": {"role": "assistant", "content": step}}]}, 200
        data = json.dumps(payload).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:
            pass  # the client gave up waiting (the timeout test)

    def asks(self, question: str) -> int:
        return sum(self.question_of(r["body"]) == question for r in self.requests)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def files(tmp_path):
    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    out = {"questions": write("q.jsonl", QUESTIONS), "contexts": write("ctx.jsonl", CONTEXTS),
           "reference": write("ref.jsonl", REFERENCE), "answers": write("ans.jsonl", ANSWERS),
           "rules": tmp_path / "rule.json", "out": tmp_path / "reviews" / "review.jsonl"}
    out["rules"].write_text(json.dumps(RULES))
    return out


@pytest.fixture
def judge_factory():
    judges = []

    def make(script):
        judges.append(Judge(script))
        return judges[-1]

    yield make
    for judge in judges:
        judge.close()


def review(files, judge, *extra, env="TEST_JUDGE_KEY"):
    argv = ["eval", "review", "--out", str(files["out"]), "--judge-url", judge.url, "--judge-model", "judge-1",
            "--api-key-env", env, "--timeout", "0.4", "--backoff", "0.01", "--retries", "2", *extra]
    for flag in ("questions", "contexts", "reference", "answers", "rules"):
        argv += [f"--{flag}", str(files[flag])]
    return main(argv)


def reviews(files):
    return [json.loads(line) for line in files["out"].read_text().splitlines()]


def good_script(**overrides):
    script = {q["text"]: ["8 9\nBoth are fine."] for q in QUESTIONS}
    script.update(overrides)
    return script


def test_each_request_is_the_originals_review_request(files, judge_factory, monkeypatch, capsys):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test")
    judge = judge_factory(good_script())
    assert review(files, judge) == 0
    assert len(judge.requests) == 4
    for request in judge.requests:
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == "Bearer sk-test"
        body = request["body"]
        assert (body["model"], body["temperature"], body["max_tokens"]) == ("judge-1", 0.0, 1024)
        assert body["messages"][0] == {"role": "system", "content": SYSTEM_MESSAGE}
        question = next(q for q in QUESTIONS if q["text"] == judge.question_of(body))
        qid, content = question["question_id"], body["messages"][1]["content"]
        context = next(c for c in CONTEXTS if c["image"] == question["image"])
        for expected in (question["text"], f"reference answer {qid}", f"model answer {qid}",
                         RULES[question["category"]]["prompt"], *context["captions"]):
            assert expected in content
    first = next(r for r in judge.requests if judge.question_of(r["body"]) == QUESTIONS[0]["text"])
    assert first["body"]["messages"][1]["content"] == (
        "[Context]\nA red bus on a street.\nA bus parked by a kerb.\n\n"
        "bus: [0.1, 0.2, 0.9, 0.8]\nperson: [0.5, 0.5, 0.6, 0.9]\n\n"
        "[Question]\nWhat colour is the bus?\n\n"
        "[Assistant 1]\nreference answer 0\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nmodel answer 0\n\n[End of Assistant 2]\n\n"
        "[System]\nRate the conversation answers. RULE-CONV\n\n")
    rows = reviews(files)
    assert [r["question_id"] for r in rows] == [0, 1, 2, 3]  # rewritten in question order
    assert rows[1] == {"id": 2, "question_id": 1, "answer1_id": 1, "answer2_id": "ans-1", "category": "detail",
                       "content": "8 9\nBoth are fine.", "tuple": [8.0, 9.0]}
    out = capsys.readouterr()
    assert "reviewed 4 now, 0 already" in out.err
    assert "all       4      8.0        9.0    112.5" in out.out


def test_malformed_rate_limited_and_slow_replies(files, judge_factory, capsys):
    judge = judge_factory(good_script(**{
        QUESTIONS[1]["text"]: ["Assistant 1 gets 7 and Assistant 2 gets 6."],   # no score pair on line 1
        QUESTIONS[2]["text"]: [429, 503, "7, 6\nclose"],                          # rate limited, then a 5xx
        QUESTIONS[3]["text"]: [("slow", 1.5, "1 1"), "6.5 3"],                    # times out once
    }))
    assert review(files, judge, "--concurrency", "2") == 0
    scores = {r["question_id"]: r["tuple"] for r in reviews(files)}
    assert scores == {0: [8.0, 9.0], 1: [-1, -1], 2: [7.0, 6.0], 3: [6.5, 3.0]}
    assert [judge.asks(q["text"]) for q in QUESTIONS] == [1, 1, 3, 2]
    err = capsys.readouterr().err
    assert "1 replies had no score pair (recorded as [-1, -1])" in err
    assert "note: $TEST_JUDGE_KEY is not set" in err
    assert all("Authorization" not in r["headers"] for r in judge.requests)


def test_resume_asks_nothing_twice(files, judge_factory, capsys):
    failing = judge_factory(good_script(**{QUESTIONS[2]["text"]: [400]}))
    assert review(files, failing, "--concurrency", "1") == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("llavakit: error: the judge at ")
    assert "HTTP 400: status 400 from the test judge" in err.splitlines()[-1]
    written = {r["question_id"] for r in reviews(files)}
    assert 2 not in written and written <= {0, 1, 3}
    good = judge_factory(good_script())
    assert review(files, good) == 0
    assert sorted(Judge.question_of(r["body"]) for r in good.requests) == sorted(
        q["text"] for q in QUESTIONS if q["question_id"] not in written)
    assert [r["question_id"] for r in reviews(files)] == [0, 1, 2, 3]
    again = judge_factory(good_script())
    assert review(files, again) == 0 and again.requests == []
    assert "reviewed 0 now, 4 already in" in capsys.readouterr().err


def test_retries_give_up_with_one_line(files, judge_factory, capsys):
    judge = judge_factory(good_script(**{q["text"]: [503] for q in QUESTIONS}))
    assert review(files, judge, "--concurrency", "1") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "note: $TEST_JUDGE_KEY" in err  # the key note, then the one error line
    assert "failed 3 times (last: HTTP 503: status 503 from the test judge); rerun later" in err
    assert judge.asks(QUESTIONS[0]["text"]) == 3


def test_refused_key_is_not_retried(files, judge_factory, monkeypatch, capsys):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-wrong")
    judge = judge_factory(good_script(**{q["text"]: [401] for q in QUESTIONS}))
    assert review(files, judge, "--concurrency", "1") == 1
    assert "HTTP 401: status 401 from the test judge: check the API key" in capsys.readouterr().err
    assert len(judge.requests) == 1


@pytest.mark.parametrize("which", ["answers", "reference"])
def test_missing_answer_is_a_clear_error_before_asking(files, judge_factory, capsys, which):
    rows = [json.loads(line) for line in files[which].read_text().splitlines()]
    files[which].write_text("".join(json.dumps(r) + "\n" for r in rows if r["question_id"] != 2))
    judge = judge_factory(good_script())
    assert review(files, judge) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == (f"llavakit: error: {files[which]} has no answer for question_id 2 "
                                    f"({files['questions']}:3); answer every question before the review")
    assert judge.requests == [] and not files["out"].exists()


def test_question_without_id_or_rule_is_a_clear_error(files, judge_factory, capsys):
    judge = judge_factory(good_script())
    files["questions"].write_text(json.dumps({"image": "a.jpg", "text": "Hi", "category": "conv"}) + "\n")
    assert review(files, judge) == 1
    assert f"error: {files['questions']}:1 has no 'question_id' key" in capsys.readouterr().err
    files["questions"].write_text(json.dumps({**QUESTIONS[0], "category": "complex"}) + "\n")
    assert review(files, judge) == 1
    assert f"has no rule for category 'complex' ({files['questions']}:1)" in capsys.readouterr().err
    assert judge.requests == []


def test_category_prefix_picks_the_bench_rule_and_labels_the_review(files, judge_factory):
    files["questions"].write_text(json.dumps(QUESTIONS[0]) + "\n")
    judge = judge_factory(good_script())
    assert review(files, judge, "--category-prefix", "llava_bench_") == 0
    assert "RULE-BENCH-CONV" in judge.requests[0]["body"]["messages"][1]["content"]
    assert reviews(files)[0]["category"] == "llava_bench_conv"


@pytest.mark.parametrize("reply, scores", [
    ("8 9", [8.0, 9.0]), ("8,9", [8.0, 9.0]), ("8, 9\nbecause", [8.0, 9.0]), ("7.5 10 \n", [7.5, 10.0]),
    ("8 9 10", [-1, -1]), ("Scores: 8 9", [-1, -1]), ("(8, 9)", [-1, -1]), ("", [-1, -1]), ("nan 3", [-1, -1]),
    ("\n8 9", [-1, -1]),
])
def test_parse_score_reads_the_first_line(reply, scores):
    assert parse_score(reply) == scores


def test_context_text_forms():
    assert context_text({"captions": ["a", "b"], "instances": []}) == "a\nb\n\n"  # the original's empty box block
    assert context_text({"caption": "One long description."}) == "One long description."  # LLaVA-Bench Wild
    assert context_text({"captions": "A text-rich cover.\n\nOCR WORDS"}) == "A text-rich cover.\n\nOCR WORDS"  # LLaVAR


def test_judge_url_must_be_http(files, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "review", "--judge-url", "localhost:8000", "--judge-model", "j", "--out", str(files["out"]),
              *[arg for flag in ("questions", "contexts", "reference", "answers", "rules")
                for arg in (f"--{flag}", str(files[flag]))]])
    assert e.value.code == 2 and "expected an http:// or https:// URL" in capsys.readouterr().err


def test_endpoint_is_the_chat_completions_route():
    assert JudgeClient("http://h:1/v1/", "m").endpoint == "http://h:1/v1/chat/completions"
    assert JudgeClient("http://h:1/v1/chat/completions", "m").endpoint == "http://h:1/v1/chat/completions"
