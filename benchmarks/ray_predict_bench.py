"""`llavakit predict --ray` throughput: questions per second with 1 and 2 replicas of the demo model on a local
Ray cluster (CPU replicas, --threads each), beside the one-process `llavakit predict`, and the projection for N
GPU replicas from a per-replica rate.

Each Ray run is measured twice: end to end (replicas start, load the model, answer everything) and in steady
state (the questions after the first batch over the time from the first batch's answers to the last answer: the
rate a long run approaches once its replicas are up).
Runs are interleaved (one of each candidate per round, the order reversed every other round) so load from other
processes hits them alike; min and median are reported. Writes JSON under --out, named with the date and machine.

    python benchmarks/ray_predict_bench.py [--scenes 24] [--rounds 3] [--threads 1] [--batch-size 8] [--out DIR]
    python benchmarks/ray_predict_bench.py --scenes 4 --rounds 1 --out /tmp/bench   # smoke run, ~1 min
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import threading
import time
from pathlib import Path

import ray
import ray.data
import torch

from llavakit.cli import main as llavakit
from llavakit.demo.evaluate import export_benchmark
from llavakit.sampling import SamplingParams
from llavakit.scale.ray_predict import PredictSettings, predict_dataset

# The engine on one H100 (benchmarks/results/gpu_llava-1.5-7b_H100_2026-11-23.json, "ours" / "concurrent"):
# 64 concurrent llava-1.5-7b requests, one image and 256 generated tokens each, in 8.14 s.
H100_REQUESTS, H100_SECONDS = 64, 8.139


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def first_batch(path: Path, stop: threading.Event, out: dict) -> None:
    """Polls `path` until it holds answers: records when (perf_counter) and, 20 ms later (the driver writes a
    batch's answers together), how many."""
    while not stop.is_set():
        if path.exists() and path.stat().st_size > 0:
            out["first"] = time.perf_counter()
            time.sleep(0.02)
            out["lines"] = path.read_bytes().count(b"\n")
            return
        time.sleep(0.005)


def ray_run(rows: list[dict], images: Path, work: Path, replicas: int, args) -> dict:
    """One `predict --ray`-equivalent run on a fresh answers file: end-to-end and steady-state rates."""
    answers = work / f"ray-{replicas}-{time.monotonic_ns()}.jsonl"
    settings = PredictSettings(model="demo", sampling=SamplingParams(max_tokens=128), image_folder=str(images),
                               threads=args.threads)
    items = [{"question": json.dumps(r)} for r in rows]
    questions = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / args.batch_size))
    stop, seen = threading.Event(), {}
    watcher = threading.Thread(target=first_batch, args=(answers, stop, seen))
    watcher.start()
    start = time.perf_counter()
    counts = predict_dataset(questions, answers, settings, num_replicas=replicas, batch_size=args.batch_size,
                             progress=False)
    end = time.perf_counter()
    stop.set()
    watcher.join()
    assert counts.answered == len(rows) and "lines" in seen, (counts, seen)
    return {"end_to_end_q_per_s": len(rows) / (end - start),
            "steady_q_per_s": (len(rows) - seen["lines"]) / (end - seen["first"]),
            "first_batch_s": seen["first"] - start}


def one_process_run(questions: Path, images: Path, work: Path, args) -> dict:
    """The one-process `llavakit predict` (the plain loop, one question at a time), model load included."""
    answers = work / f"one-{time.monotonic_ns()}.jsonl"
    start = time.perf_counter()
    assert llavakit(["predict", "--model", "demo", "--questions", str(questions), "--image-folder", str(images),
                     "--answers", str(answers), "--threads", str(args.threads)]) == 0
    n = len(answers.read_text().splitlines())
    return {"end_to_end_q_per_s": n / (time.perf_counter() - start)}


def summarize(runs: list[dict]) -> dict:
    keys = runs[0].keys()
    return {k: {"min": round(min(r[k] for r in runs), 3), "median": round(statistics.median(r[k] for r in runs), 3)}
            for k in keys}


def projection(one: dict, two: dict) -> dict:
    """N replicas at N times one replica's rate, the ideal Ray Data approaches when each replica has its own
    device and the driver only writes answer lines; a projection, not a measurement."""
    per_replica_cpu = one["steady_q_per_s"]["median"]
    h100 = H100_REQUESTS / H100_SECONDS
    return {
        "kind": "projection (not measured): N replicas x the per-replica rate",
        "measured_2_vs_1_steady_speedup": round(two["steady_q_per_s"]["median"] / per_replica_cpu, 2),
        "per_replica_cpu_demo_q_per_s": per_replica_cpu,
        "per_replica_h100_llava_1_5_7b_q_per_s": round(h100, 2),
        "h100_source": "benchmarks/results/gpu_llava-1.5-7b_H100_2026-11-23.json (64 concurrent requests, "
                       "256 generated tokens each, 8.14 s); short VQA answers would be faster",
        "n_gpus_q_per_s": {n: round(n * h100, 1) for n in (1, 8, 64, 512)},
        "n_gpus_hours_per_million_questions": {n: round(1e6 / (n * h100) / 3600, 2) for n in (1, 8, 64, 512)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=24, help="demo scenes (about 4.7 questions each)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per replica and in the one-process run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/llavakit-bench/ray-predict"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    export_benchmark(args.workdir, n=args.scenes)
    questions, images = args.workdir / "questions.jsonl", args.workdir / "images"
    rows = [json.loads(line) for line in questions.read_text().splitlines()]
    ray.init(num_cpus=2 * args.threads, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    runs: dict[str, list[dict]] = {"one_process": [], "ray_1_replica": [], "ray_2_replicas": []}
    loads = []
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            loads.append(os.getloadavg()[0])
            if name == "one_process":
                result = one_process_run(questions, images, args.workdir, args)
            else:
                result = ray_run(rows, images, args.workdir, 1 if name == "ray_1_replica" else 2, args)
            runs[name].append(result)
            print(f"round {r + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()), flush=True)
    ray.shutdown()

    summary = {name: summarize(v) for name, v in runs.items()}
    report = {
        "date": datetime.date.today().isoformat(), "cpu": cpu_name(), "cpus": os.cpu_count(),
        "load_average_1min": {"min": min(loads), "max": max(loads)}, "torch": torch.__version__,
        "ray": ray.__version__, "model": "demo", "questions": len(rows), "max_new_tokens": 128,
        "threads_per_replica": args.threads, "batch_size": args.batch_size, "rounds": args.rounds,
        "summary": summary, "runs": runs,
        "projection": projection(summary["ray_1_replica"], summary["ray_2_replicas"]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ray_predict_demo_cpu-{os.cpu_count()}c_{report['date']}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"summary": summary, "projection": report["projection"]}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
