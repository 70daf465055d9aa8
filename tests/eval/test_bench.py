"""`llavakit bench` (llavakit.eval.bench): every timed shape follows an untimed run of the same shape, every
request has its own image unless reuse is asked for, transformers gets the very requests the engine ran,
and the output speaks of MindIE's performance protocol."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from checkpoints import build_hf_model, write_hf_checkpoint

from llavakit.eval import bench


class CountingEngine:
    """Stands in for BenchEngine: each step finishes everything queued; it counts the batches it ran and the
    images it would encode (new content only, as the engine's vision cache does)."""

    def __init__(self):
        self.runner = SimpleNamespace(device=torch.device("cpu"), images_encoded=0)
        self.pipe = None
        self.batches: list[list[dict]] = []
        self._queued: list = []
        self._seen: set[str] = set()

    def submit(self, request_id, request, params):
        self._queued.append((request_id, request, params))

    def has_unfinished(self):
        return bool(self._queued)

    def step(self):
        batch, self._queued = self._queued, []
        keys = {bench.image_key(im) for _, r, _ in batch for im in r["images"]}
        self.runner.images_encoded += len(keys - self._seen)
        self._seen |= keys
        self.batches.append([r for _, r, _ in batch])
        return [SimpleNamespace(request_id=rid, finished=True, outputs=[SimpleNamespace(token_ids=[0] * p.max_tokens)])
                for rid, _, p in batch]


def keys(requests) -> set[str]:
    return {bench.image_key(im) for r in requests for im in r["images"]}


@pytest.fixture
def recorded_runs(monkeypatch):
    """Every run_batch call and its result, in order."""
    calls = []
    real = bench.run_batch

    def record(engine, requests, params):
        result = real(engine, requests, params)
        calls.append((requests, result, params))
        return result

    monkeypatch.setattr(bench, "run_batch", record)
    return calls


def test_each_batch_size_is_timed_after_an_untimed_run_of_the_same_shape(recorded_runs):
    engine = CountingEngine()
    results = bench.mindie_protocol(engine, [1, 2, 3], output_tokens=4)
    assert [len(b) for b in engine.batches] == [1, 1, 2, 2, 3, 3]
    assert len(recorded_runs) == 6
    for k, (bs, result) in enumerate(zip([1, 2, 3], results, strict=True)):
        (warm, _, _), (timed, timed_result, _) = recorded_runs[2 * k], recorded_runs[2 * k + 1]
        assert result is timed_result  # what is reported is the second run of each size
        assert [r["prompt"] for r in warm] == [r["prompt"] for r in timed] and len(warm) == len(timed) == bs
        assert not keys(warm) & keys(timed)  # the warm-up leaves none of the timed images in the cache
        assert result.distinct_images == result.images_encoded == bs
    assert [r.batch_size for r in results] == [1, 2, 3]
    engine = CountingEngine()
    bench.mindie_protocol(engine, [1, 2], output_tokens=4, warmup=False)
    assert [len(b) for b in engine.batches] == [1, 2]


def test_suite_warms_up_once_and_gives_transformers_the_same_requests(recorded_runs, monkeypatch):
    seen_by_hf = []

    def fake_hf_measure(hf, pipe, one, output_tokens, reqs, params, warmup=True):
        seen_by_hf.append((one, reqs, params, warmup))
        return {"ttft_ms": 100.0, "bs1_decode_tokens_per_s": 10.0, "one_by_one_tokens_per_s": 10.0,
                "padded_batch_tokens_per_s": 20.0}

    monkeypatch.setattr(bench, "hf_measure", fake_hf_measure)
    engine = CountingEngine()
    suite = bench.run_suite(engine, [1, 2], output_tokens=4, requests=5, repeats=2, hf=object(), log=lambda _: None)
    # round 1: warm 1, timed 1, warm 2, timed 2, warm offline, timed offline; round 2: timed only
    assert [len(b) for b in engine.batches] == [1, 1, 2, 2, 5, 5, 1, 2, 5]
    timed = [recorded_runs[i] for i in (1, 3, 5, 6, 7, 8)]
    for requests, result, _ in timed:  # fresh images every timed run: the engine encodes all of them
        assert result.distinct_images == result.images_encoded == len(requests)
    (one, reqs, params, warmup), (one2, reqs2, _, warmup2) = seen_by_hf
    assert reqs is recorded_runs[5][0] and reqs2 is recorded_runs[8][0]  # the offline requests themselves
    assert params is recorded_runs[5][2] and len(params) == 5
    assert keys(one) == keys(recorded_runs[1][0]) and one[0]["prompt"] == recorded_runs[1][0][0]["prompt"]
    assert keys(one2) == keys(recorded_runs[6][0])
    assert (warmup, warmup2) == (True, False)
    rows = suite.protocol()
    assert [r["batch_size"] for r in rows] == [1, 2] and rows[1]["images_encoded"] == 2
    assert set(suite.ratios()) == {"ratio_vs_one_by_one", "ratio_vs_padded_batch", "ratio_bs1_decode",
                                   "ratio_ttft"}
    assert suite.summary()["offline_tokens_per_s"]["min"] <= suite.summary()["offline_tokens_per_s"]["median"]


def test_workloads_use_distinct_images_unless_asked():
    reqs, params = bench.mixed_workload(32, max_out=64)
    assert bench.count_distinct_images(reqs) == 32 and len(reqs) == len(params) == 32
    assert all(1 <= p.max_tokens <= 64 and p.ignore_eos for p in params)
    reused, _ = bench.mixed_workload(32, max_out=64, distinct_images=4)
    assert bench.count_distinct_images(reused) == 4
    assert len({id(r["images"][0]) for r in reused}) == 4
    protocol, pparams = bench.protocol_requests(10, 256)
    assert bench.count_distinct_images(protocol) == 10 and {p.max_tokens for p in pparams} == {256}
    assert bench.count_distinct_images(bench.protocol_requests(10, distinct_images=3)[0]) == 3
    # no two workloads share an image: warm-up vs timed, protocol vs offline, round vs round
    warm, _ = bench.protocol_requests(10, 256, purpose=bench.WARMUP)
    again, _ = bench.protocol_requests(10, 256, repeat=1)
    offline_warm, warm_params = bench.mixed_workload(32, max_out=64, purpose=bench.OFFLINE_WARMUP)
    sets = [keys(x) for x in (reqs, protocol, warm, again, offline_warm)]
    assert sum(len(s) for s in sets) == len(set().union(*sets))
    # the offline warm-up has the timed set's shape: same questions and lengths
    assert [r["prompt"] for r in offline_warm] == [r["prompt"] for r in reqs]
    assert [p.max_tokens for p in warm_params] == [p.max_tokens for p in params]
    # and the same call gives the same images (transformers can be given the engine's requests again)
    assert keys(bench.protocol_requests(10, 256)[0]) == keys(protocol)


def test_protocol_name():
    assert bench.protocol_name() == "MindIE's performance protocol (batch 1-10 x 256 tokens)"
    assert bench.protocol_name([1, 2, 4], 64) == "MindIE's performance protocol (batch 1,2,4 x 64 tokens)"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_hf_checkpoint(build_hf_model("llava", seed=5), tmp_path_factory.mktemp("bench") / "ck", "hub")


def test_llavakit_bench_against_transformers(ckpt, tmp_path, capsys):
    from llavakit.cli import main

    assert main(["bench", "--model", str(ckpt), "--device", "cpu", "--dtype", "float32", "--compare-transformers",
                 "--batch-sizes", "1,2", "--output-tokens", "4", "--requests", "3", "--repeats", "2",
                 "--out", str(tmp_path), "--name", "b"]) == 0
    out = capsys.readouterr()
    report = json.loads((tmp_path / "b.json").read_text())
    csv = (tmp_path / "b.csv").read_text()
    for text in (out.out, out.err, json.dumps(report), csv):
        assert "seed" not in text.lower()
    assert "MindIE's performance protocol (batch 1,2 x 4 tokens)" in out.out
    assert [r["batch_size"] for r in report["mindie_protocol"]] == [1, 2]
    assert all(r["distinct_images"] == r["images_encoded"] == r["batch_size"] for r in report["mindie_protocol"])
    assert report["offline"]["distinct_images"] == report["offline"]["images_encoded"] == 3
    assert len(report["rounds"]) == 2 and report["repeats"] == 2
    for key in ("ttft_ms", "bs1_decode_tokens_per_s", "one_by_one_tokens_per_s", "padded_batch_tokens_per_s",
                "ratio_bs1_decode", "ratio_vs_one_by_one", "ratio_vs_padded_batch", "ratio_ttft"):
        assert report["transformers"][key] > 0
    assert report["kv_blocks"] == -(-report["max_model_len"] // 16) * 3  # the bench's own limits, not 4 GiB
    assert csv.splitlines()[0].startswith("round,workload,batch_size")
    assert len(csv.splitlines()) == 1 + 2 * (2 + 1)  # one row per timed run


def test_bench_help_names_the_protocol_and_the_reuse_flag(capsys):
    from llavakit.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert "MindIE's performance protocol" in text and "--distinct-images" in text and "seed" not in text.lower()
