"""The engine's CPU decode step against its weight-matmul floor, and 32 distinct-image requests against
transformers, on `bench-small` (random weights, fp32), at each thread count asked for.

(a) Decode step: B requests (the offline set's prompts, each its own image) are prefilled and decoded for
`--context` tokens; then `--steps` engine steps are timed one by one (the whole `LLMEngine.step`: scheduler,
model, sampler, detokenizer). The floor is the same step's Linear matmuls alone: F.linear of a (B, in) input
with every decoder weight in the shapes the step multiplies by, then the LM head. Floor and step alternate
(each step right after a floor), so both meet the same load; a round reports the ratio of the minima, of the
medians and the median of the pairs' ratios.
(b) Throughput: `--requests` requests, every one its own image, mixed questions and lengths (the offline set of
`llavakit bench`), through the engine, then transformers' generate on the same requests as one padded batch and
one by one; rounds interleave all three on fresh images. Then the workload's matmul floor: the decoder's
weights times each step's tokens and the LM head times its rows, for the steps the engine ran; transformers'
time over that floor is how far ahead of it any engine could get.

    python benchmarks/cpu_engine_bench.py [--threads 1,2] [--rounds 3] [--batch-sizes 1,32] [--out DIR]
    python benchmarks/cpu_engine_bench.py --threads 1 --rounds 1 --steps 4 --requests 4 --output-tokens 8 \
        --out /tmp/bench   # smoke run, ~1 min
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import llavakit
from llavakit.eval import bench
from llavakit.sampling import SamplingParams


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "runs": values}


def linear_weights(model) -> list[torch.Tensor]:
    """The weights one decode step multiplies by, in its shapes (fused q/k/v and gate/up when the model is)."""
    ws = []
    for layer in model.language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        ws += [attn.qkv_weight] if attn.qkv_weight is not None else [attn.q_proj.weight, attn.k_proj.weight,
                                                                    attn.v_proj.weight]
        ws.append(attn.o_proj.weight)
        ws += [mlp.gate_up_weight] if mlp.gate_up_weight is not None else [mlp.gate_proj.weight, mlp.up_proj.weight]
        ws.append(mlp.down_proj.weight)
    return ws + [model.lm_head.weight]


def timed(fn) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call. CPU time leaves out the time other jobs on a shared machine held
    the core; at one thread it is the figure least moved by the load."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def matmuls(weights: list[torch.Tensor], rows: int):
    """The floor: each weight times a (rows, in) input, in order (the LM head last, as in a step)."""
    xs = [torch.randn(rows, w.shape[1]) for w in weights]

    @torch.inference_mode()
    def run():
        for x, w in zip(xs, weights, strict=True):
            F.linear(x, w)

    return run


def decoding_engine(pipe, batch: int, context: int, steps: int, rnd: int) -> bench.BenchEngine:
    """An engine with `batch` running sequences, each `context` tokens into its answer, room for `steps` more."""
    engine = bench.engine_for(pipe, max_num_seqs=batch, max_model_len=bench.needed_model_len(pipe, context + steps + 2))
    reqs, _ = bench.mixed_workload(batch, repeat=rnd, purpose=bench.OFFLINE)
    for i, r in enumerate(reqs):
        engine.submit(f"r{i}", r, SamplingParams(max_tokens=context + steps + 2, ignore_eos=True, temperature=0))
    running = engine.scheduler.running
    while engine.scheduler.waiting or min(s.num_output_tokens for s in running) < context:
        engine.step()
    assert len(running) == batch and not engine.scheduler.waiting
    return engine


def decode_round(pipe, weights, batch: int, args, rnd: int) -> dict:
    """`steps` pairs of (the floor, one engine step), each pair back to back so that both meet the same load."""
    engine, floor = decoding_engine(pipe, batch, args.context, args.steps, rnd), matmuls(weights, batch)
    floor()
    pairs = [(timed(floor), timed(engine.step)) for _ in range(args.steps)]
    row = {"load_average": load_average()}
    for k, clock in enumerate(("wall", "cpu")):
        f, st = [p[0][k] for p in pairs], [p[1][k] for p in pairs]
        row[clock] = {"floor_ms": f, "step_ms": st, "ratio_of_mins": min(st) / min(f),
                      "ratio_of_medians": statistics.median(st) / statistics.median(f),
                      "median_pair_ratio": statistics.median(b / a for a, b in zip(f, st, strict=True))}
    return row

def throughput(pipe, hf, requests: int, output_tokens: int, rnd: int, one_by_one: bool) -> dict:
    """Tokens/s of the engine, transformers' padded batch and (optionally) one by one, on the same requests."""
    engine = bench.engine_for(pipe, max_num_seqs=requests, max_model_len=bench.needed_model_len(pipe, output_tokens))
    if rnd == 0:  # untimed warm-up of every shape, on other images
        bench.run_batch(engine, *bench.mixed_workload(requests, max_out=output_tokens, purpose=bench.OFFLINE_WARMUP))
        warm, _ = bench.mixed_workload(requests, max_out=output_tokens, purpose=bench.OFFLINE_WARMUP)
        bench.hf_generate(hf, pipe, warm, [SamplingParams(max_tokens=2)] * requests, requests)
    reqs, params = bench.mixed_workload(requests, max_out=output_tokens, repeat=rnd)
    steps = record_steps(engine)
    result = bench.run_batch(engine, reqs, params)
    hf_batched = bench.hf_generate(hf, pipe, reqs, params, requests)
    out = {"engine": result.throughput_tokens_per_s, "transformers_batched": hf_batched.tokens_per_s,
           "engine_s": result.total_s, "transformers_batched_s": hf_batched.seconds}
    if one_by_one:
        hf_single = bench.hf_generate(hf, pipe, reqs, params, 1)
        out["transformers_one_by_one"], out["transformers_one_by_one_s"] = hf_single.tokens_per_s, hf_single.seconds
    out["floor_s"] = workload_floor(pipe, steps)
    return out


RATES = ("engine", "transformers_batched", "transformers_one_by_one")


def record_steps(engine) -> list[tuple[int, int]]:
    """(tokens, sequences) of each step the engine runs from now on."""
    steps, execute = [], engine.runner.execute

    def recording(batch, media):
        steps.append((batch.num_tokens, len(batch.items)))
        return execute(batch, media)

    engine.runner.execute = recording
    return steps


def workload_floor(pipe, steps: list[tuple[int, int]]) -> dict:
    """The matmul floor of the steps the engine ran: every decoder weight times each step's tokens, the LM head
    times its sequences (one logits row each), timed as in `matmuls`. Left out, so the floor is below what any
    implementation needs: the vision tower, attention, norms and sampling. The engine's time over it bounds how
    far any engine could get ahead of transformers on this workload."""
    decoder, head = linear_weights(pipe.model)[:-1], pipe.model.lm_head.weight
    times: dict[tuple[int, int], float] = {}
    total = {"prefill": 0.0, "decode": 0.0}
    for tokens, seqs in steps:
        if (tokens, seqs) not in times:
            run_decoder, run_head = matmuls(decoder, tokens), matmuls([head], seqs)
            times[tokens, seqs] = min(timed(run_decoder)[0] + timed(run_head)[0] for _ in range(3)) / 1e3
        total["decode" if tokens == seqs else "prefill"] += times[tokens, seqs]
    return total


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(pipe, hf, args, threads: int, log) -> dict:
    torch.set_num_threads(threads)
    weights = linear_weights(pipe.model)
    result: dict = {"threads": threads, "load_average_before": load_average(), "decode": {}}
    for batch in args.batch_sizes:
        rounds = []
        for rnd in range(args.rounds):
            rounds.append(row := decode_round(pipe, weights, batch, args, rnd))
            w = row["wall"]
            log(f"threads {threads} batch {batch} round {rnd}: step min {min(w['step_ms']):.1f} ms median "
                f"{statistics.median(w['step_ms']):.1f}, floor min {min(w['floor_ms']):.1f} -> "
                f"{w['ratio_of_mins']:.2f}x (pairs {w['median_pair_ratio']:.2f}x, CPU time "
                f"{row['cpu']['ratio_of_mins']:.2f}x), load {row['load_average']}")
        result["decode"][str(batch)] = {
            clock: {"step_ms": spread([min(r[clock]["step_ms"]) for r in rounds]),
                    "floor_ms": spread([min(r[clock]["floor_ms"]) for r in rounds]),
                    **{k: spread([r[clock][k] for r in rounds])
                       for k in ("ratio_of_mins", "ratio_of_medians", "median_pair_ratio")}}
            for clock in ("wall", "cpu")} | {"rounds": rounds}
    if args.requests:
        rounds = []
        for rnd in range(args.rounds):
            r = throughput(pipe, hf, args.requests, args.output_tokens, rnd, one_by_one=rnd < args.one_by_one_rounds)
            r["load_average"] = load_average()
            rounds.append(r)
            log(f"threads {threads} throughput round {rnd}: " + ", ".join(
                f"{k} {r[k]:.1f} tok/s" for k in RATES if k in r) + f"; matmul floor {r['floor_s']}")
        tp = {k: spread([r[k] for r in rounds if k in r]) for k in rounds[0] if k not in ("load_average", "floor_s")}
        tp["ratio_vs_batched"] = spread([r["engine"] / r["transformers_batched"] for r in rounds])
        floors = [r["floor_s"]["prefill"] + r["floor_s"]["decode"] for r in rounds]
        tp["engine_over_floor"] = spread([r["engine_s"] / f for r, f in zip(rounds, floors, strict=True)])
        tp["ceiling_vs_batched"] = spread([r["transformers_batched_s"] / f for r, f in zip(rounds, floors,
                                                                                           strict=True)])
        tp["prefill_share_of_floor"] = spread([r["floor_s"]["prefill"] / f for r, f in zip(rounds, floors,
                                                                                           strict=True)])
        pairs = [r["engine"] / r["transformers_one_by_one"] for r in rounds if "transformers_one_by_one" in r]
        if pairs:
            tp["ratio_vs_one_by_one"] = spread(pairs)
            tp["ceiling_vs_one_by_one"] = spread([r["transformers_one_by_one_s"] / (r["floor_s"]["prefill"]
                                                  + r["floor_s"]["decode"]) for r in rounds
                                                  if "transformers_one_by_one" in r])
        result["throughput"] = {**tp, "rounds": rounds}
    result["load_average_after"] = load_average()
    return result


def chart(report: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels, steps, floors = [], [], []
    for r in report["runs"]:
        for b, d in r["decode"].items():
            labels.append(f"{r['threads']}t bs{b}")
            steps.append(d["wall"]["step_ms"]["median"])
            floors.append(d["wall"]["floor_ms"]["median"])
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], steps, 0.4, label="engine decode step")
    ax.bar([x + 0.2 for x in xs], floors, 0.4, label="weight-matmul floor")
    for x, s, f in zip(xs, steps, floors, strict=True):
        ax.text(x, s, f"{s / f:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("ms (median of rounds' minima)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.suptitle(f"bench-small fp32 decode step vs floor ({report['machine']}, {report['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="thread counts, each a separate run (comma-separated)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--context", type=int, default=64, help="answer tokens decoded before the timed steps")
    parser.add_argument("--steps", type=int, default=16, help="timed steps (and floor repetitions) per round")
    parser.add_argument("--requests", type=int, default=32, help="throughput requests (0: skip)")
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--one-by-one-rounds", type=int, default=1,
                        help="rounds that also run transformers one by one (the slowest part)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", help="results file name (default cpu_engine_bench-small_cpu-<N>c_<date>)")
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    pipe = llavakit.load("bench-small", load_format="dummy", dtype="float32", device="cpu")
    hf = bench.hf_twin(pipe) if args.requests else None

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    date = datetime.date.today().isoformat()
    report = {"model": "bench-small (dummy weights)", "dtype": "float32", "date": date,
              "machine": f"{os.cpu_count()}-core CPU {cpu_name()}", "torch": torch.__version__,
              "context": args.context, "steps": args.steps, "rounds": args.rounds,
              "requests": args.requests, "output_tokens": args.output_tokens, "runs": []}
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"cpu_engine_bench-small_cpu-{os.cpu_count()}c_{date}"
    for t in args.threads.split(","):
        report["runs"].append(run(pipe, hf, args, int(t), log))
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))  # kept if a later run is cut short
    chart(report, args.out / f"{name}.png")
    for r in report["runs"]:
        for b, d in r["decode"].items():
            w, c = d["wall"], d["cpu"]
            print(f"threads {r['threads']} batch {b}: step {w['step_ms']['median']:.1f} ms, floor "
                  f"{w['floor_ms']['median']:.1f} ms, ratio {w['ratio_of_mins']['median']:.2f}x "
                  f"(best round {w['ratio_of_mins']['min']:.2f}x; CPU time {c['ratio_of_mins']['median']:.2f}x)")
        if "throughput" in r:
            t = r["throughput"]
            line = (f"threads {r['threads']} {args.requests} requests: engine {t['engine']['median']:.1f} tok/s, "
                    f"{t['ratio_vs_batched']['median']:.2f}x transformers batched")
            if "ratio_vs_one_by_one" in t:
                line += f", {t['ratio_vs_one_by_one']['median']:.2f}x one by one"
            line += (f"; engine at {t['engine_over_floor']['median']:.2f}x its matmul floor, which would be "
                     f"{t['ceiling_vs_batched']['median']:.2f}x transformers batched")
            if "ceiling_vs_one_by_one" in t:
                line += f" and {t['ceiling_vs_one_by_one']['median']:.2f}x one by one"
            print(line)
    print(f"wrote {args.out / name}.json")
    return 0


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


if __name__ == "__main__":
    sys.exit(main())
