"""`llavakit predict --ray` on a local Ray cluster of two CPU replicas of the demo model: the answers file is the
one-process run's, line for line (in another order); a replica killed mid-run is restarted and every question
is answered exactly once; a rerun answers nothing; replicas fetch URL images through the guarded fetcher. One
cluster for the module (Ray's start-up is seconds)."""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llavakit.cli import main
from llavakit.demo.evaluate import export_benchmark
from llavakit.processing.media import FetchPolicy
from llavakit.sampling import SamplingParams

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

BAD = {"question_id": "nofile", "image": "missing.png", "text": "Where?"}  # a string id among ints, no image


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Demo benchmark questions, and the one-process run's answers to them."""
    root = tmp_path_factory.mktemp("ray")
    export_benchmark(root, n=4)
    questions = root / "questions.jsonl"
    rows = [json.loads(line) for line in questions.read_text().splitlines()]
    reference = root / "reference.jsonl"
    assert main(["predict", "--model", "demo", "--questions", str(questions), "--image-folder", str(root / "images"),
                 "--answers", str(reference), "--threads", "1"]) == 0
    assert len(reference.read_text().splitlines()) == len(rows) > 10
    return root, rows, reference


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_ray_run_writes_the_one_process_answers_and_a_rerun_is_a_no_op(cluster, bench, tmp_path, capsys):
    root, rows, reference = bench
    answers = tmp_path / "answers.jsonl"
    argv = ["predict", "--model", "demo", "--questions", str(root / "questions.jsonl"), "--image-folder",
            str(root / "images"), "--answers", str(answers), "--threads", "1", "--ray", "--num-replicas", "2",
            "--batch-size", "3"]
    assert main(argv) == 0
    assert f"answered {len(rows)}, already done 0, skipped 0" in capsys.readouterr().err
    assert sorted(_lines(answers)) == sorted(_lines(reference))

    before = answers.read_bytes()
    assert main(argv) == 0
    assert answers.read_bytes() == before
    assert f"answered 0, already done {len(rows)}, skipped 0" in capsys.readouterr().err


def _replica_pids() -> list[int]:
    """Processes of the replicas: Ray titles an actor's process after its class."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"ray::") and b"Answerer" in title:
            pids.append(int(entry.name))
    return pids


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def image_server(bench):
    """The benchmark's images over HTTP on 127.0.0.1; yields the port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(bench[0] / "images")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_a_killed_replica_restarts_and_every_question_is_answered_once(cluster, bench, image_server, tmp_path,
                                                                       capsys):
    from llavakit.scale.ray_predict import PredictSettings, predict_dataset

    root, rows, reference = bench
    by_url = dict(rows[5], image=f"http://127.0.0.1:{image_server}/{rows[5]['image']}")  # a trusted host
    private = dict(by_url, question_id="private", image=by_url["image"].replace("127.0.0.1", "localhost"))
    expected = _lines(reference)
    answers = tmp_path / "answers.jsonl"
    answers.write_text(expected[0] + "\n" + expected[1][:20])  # resumed: one answer, and a line cut off
    killed = {}

    def kill_a_replica_mid_run():
        deadline = time.time() + 60
        while time.time() < deadline and len(_lines(answers)) < 3:
            time.sleep(0.02)
        pids = _replica_pids()
        killed["lines"] = len(_lines(answers))
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed["pid"] = pids[0]

    watcher = threading.Thread(target=kill_a_replica_mid_run)
    watcher.start()
    items = [{"question": json.dumps(r)} for r in rows[:3] + [BAD] + rows[3:5] + [by_url, private] + rows[6:]]
    questions = ray.data.from_items(items, override_num_blocks=len(items) // 2)
    fetch = FetchPolicy(trusted_hosts=(f"127.0.0.1:{image_server}",))  # the fetcher refuses other local hosts
    settings = PredictSettings(model="demo", llm_kwargs={"fetch_policy": fetch}, image_folder=str(root / "images"),
                               sampling=SamplingParams(max_tokens=128), threads=1)
    counts = predict_dataset(questions, answers, settings, num_replicas=2, batch_size=2, progress=False)
    watcher.join()

    assert "pid" in killed and killed["lines"] < len(expected), killed  # it died while questions were left
    assert (counts.answered, counts.skipped, counts.already_done) == (len(expected) - 1, 2, 1)
    got = _lines(answers)
    ids = [json.loads(line)["question_id"] for line in got]
    assert len(ids) == len(set(ids)) == len(expected)
    assert sorted(got) == sorted(expected)
    err = capsys.readouterr().err
    assert err.count("skipped question nofile:") == 1 and "missing.png" in err
    assert err.count("skipped question private:") == 1 and "not a public internet address" in err
