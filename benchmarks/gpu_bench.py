"""The engine at real size on a GPU against transformers on the same weights, in one process.

    python benchmarks/gpu_bench.py [--preset llava-1.5-7b] [--tokenizer DIR] [--out DIR]
    python benchmarks/gpu_bench.py --preset bench-small --device cpu --dtype float32 \
        --output-tokens 8 --batch-sizes 1,2 --concurrent 4 --hf-one-by-one 1 --check-tokens 4   # smoke run

The presets with a LLaMA vocabulary (llava-1.5-*, llava-v1.6-vicuna-7b, llava-next-video-7b, bench-small) use
the LLaMA tokenizer shipped with llavakit; the others (Mistral, Yi) need `--tokenizer DIR`.

What it does, in order (results are written after every phase, so a run cut short keeps what it measured):
1. ceilings: device-to-device copy bandwidth (bytes read + written) and a bf16 matrix product;
2. correctness (fp32, the `--check-preset` model): the engine with its fast path (Triton decode kernel,
   CUDA graphs) against the same engine on the PyTorch path without graphs, and against transformers'
   greedy generate on the same weights, over mixed requests (distinct and repeated images, lengths);
3. speed (`--preset` in `--dtype`, random weights: `load_format="dummy"`): MindIE's performance protocol
   (batch 1..10, one 336-px image each, 256 output tokens: TTFT, decode tokens/s, throughput), bs-1 decode
   against the memory-bandwidth limit (the decoder's weight bytes / the copy bandwidth), the time to first
   token of one request split into preprocessing, tower, prefill, LM head and the rest (`--ttft-repeats`
   runs on fresh images, min and median; the plain total is timed without the split's synchronizations), the
   time of one captured decode step, and `--concurrent` requests at once. Every batch size and the concurrent
   set first run once untimed on other images (same shape), and every request has its own image, so no timed
   run finds its images in the engine's vision cache;
4. transformers (`LlavaForConditionalGeneration` sharing the engine's weight tensors), on the very requests
   the engine ran: TTFT and bs-1 decode on the protocol's batch-1 request (`--hf-repeats` runs, min and
   median; the medians are the headline), the protocol's padded batches, the concurrent requests as one padded
   batch and one by one (the one-by-one rate is measured on the first `--hf-one-by-one` requests: running all
   64 in turn would take ~10 minutes).
Out: <out>/<name>.json (everything), .csv (per batch size), .png (chart).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llavakit.config import EngineConfig  # noqa: E402
from llavakit.eval import bench  # noqa: E402
from llavakit.sampling import SamplingParams  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of fn() (CUDA events on a GPU, a host clock elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def ceilings(device: torch.device) -> dict:
    """Copy bandwidth (read + write bytes per second) and bf16 matmul FLOP/s, measured on random data."""
    n = (1 << 31) if device.type == "cuda" else (1 << 26)  # elements of bf16: 4 GiB on a GPU
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), device)
    m = 8192 if device.type == "cuda" else 512
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    mm_s = timed(lambda: a @ b, device)
    return {"copy_bytes_per_s": 2 * n * 2 / copy_s, "bf16_matmul_flops": 2 * m ** 3 / mm_s}


hf_twin = bench.hf_twin  # transformers' model on the engine model's own tensors


def check_requests(n_images: int = 3):
    reqs = [{"prompt": q, "images": [bench.noise(i % n_images, 336)]} for i, q in enumerate(bench.QUESTIONS * 2)]
    reqs.append({"prompt": "No image, only text: say something."})
    lengths = [17, 5, 32, 9, 24, 13, 30, 3, 20]
    return reqs, [SamplingParams(max_tokens=lengths[i % len(lengths)], ignore_eos=True) for i in range(len(reqs))]


def run_all(engine: bench.BenchEngine, reqs, params) -> list[list[int]]:
    """Every request's generated token ids, in request order."""
    ids = [f"c{i}-{time.time()}" for i in range(len(reqs))]
    for rid, r, p in zip(ids, reqs, params, strict=True):
        engine.submit(rid, r, p)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return [done[rid] for rid in ids]


def hf_greedy(hf, pipe, req, n: int) -> list[int]:
    ids = pipe.tokenize(req["prompt"], images=req.get("images"))
    kwargs = {}
    if req.get("images"):
        pixels = torch.cat([p.pixel_values for p in pipe.processor.prepare_images(req["images"])])
        kwargs["pixel_values"] = pixels.to(pipe.device, hf.dtype)
    with torch.inference_mode():
        out = hf.generate(input_ids=torch.tensor([ids], device=pipe.device), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, **kwargs)
    return out[0, len(ids):].tolist()


def correctness(args, device: torch.device) -> dict:
    import llavakit

    pipe = llavakit.load(args.check_preset, dtype="float32", device=str(device), load_format="dummy",
                         tokenizer=args.tokenizer)
    reqs, params = check_requests()
    params = [SamplingParams(max_tokens=min(p.max_tokens, args.check_tokens), ignore_eos=True) for p in params]
    from llavakit.layers import triton_ops

    triton_ops.ENABLED = False  # the plain PyTorch path first: no fused ops, no fused projections yet
    slow = bench.BenchEngine(pipe, EngineConfig(max_num_seqs=8, kv_cache_memory=1 << 30, attention_backend="torch",
                                        cuda_graphs=False))
    slow_out = run_all(slow, reqs, params)
    triton_ops.ENABLED = True
    fast = bench.BenchEngine(pipe, EngineConfig(max_num_seqs=8, kv_cache_memory=1 << 30))
    fast_out = run_all(fast, reqs, params)
    report = {"preset": args.check_preset, "requests": len(reqs), "fast_backend": fast.runner.backend,
              "cuda_graphs": fast.runner.graphs is not None and fast.runner.graphs.captured,
              "graph_steps": fast.runner.graphs.steps if fast.runner.graphs else 0,
              "fast_equals_torch_path": fast_out == slow_out,
              "images_encoded": fast.runner.images_encoded}
    hf = hf_twin(pipe)
    hf_out = [hf_greedy(hf, pipe, r, p.max_tokens) for r, p in zip(reqs, params, strict=True)]
    report["torch_path_equals_transformers"] = slow_out == hf_out
    report["fast_equals_transformers"] = fast_out == hf_out
    report["mismatched_requests"] = [i for i, (a, b) in enumerate(zip(fast_out, hf_out, strict=True)) if a != b]
    del fast, slow, hf, pipe
    return report


def concurrent_requests(args, purpose: int) -> tuple[list[dict], list[SamplingParams]]:
    """`--concurrent` requests, the protocol's question and output length, one distinct image each."""
    reqs = [{"prompt": bench.QUESTIONS[0], "images": [im]}
            for im in bench.images_for(args.concurrent, (purpose, 0, 1_000_000 + args.concurrent))]
    return reqs, [SamplingParams(max_tokens=args.output_tokens, ignore_eos=True) for _ in reqs]


def ttft_breakdown(engine: bench.BenchEngine, device: torch.device, repeats: int) -> dict:
    """Time to first token of one request (one 336-px image, the protocol's question), `repeats` times on fresh
    images: first untimed-inside (the plain total), then with a synchronized timer around the preprocessing,
    the tower (`_encode_missing`), the decoder's prefill (the model's forward) and the LM head; "rest" is the
    remainder (scheduling, batch preparation, sampling, detokenizing). min and median of each part."""
    runner = engine.runner
    parts: dict[str, float] = {}

    def wrap(obj, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def timed_call(*a, **k):
            sync(device)
            start = time.perf_counter()
            out = fn(*a, **k)
            sync(device)
            parts[key] = parts.get(key, 0.0) + time.perf_counter() - start
            return out

        setattr(obj, name, timed_call)  # an instance attribute: deleting it restores the method

    def first_token(r: int, split: bool) -> dict:
        reqs, _ = bench.protocol_requests(1, 1, purpose=bench.TIMED, repeat=1000 + 2 * r + split)
        parts.clear()
        sync(device)
        start = time.perf_counter()
        inputs = engine.pipe.processor.request_inputs(reqs[0])
        parts["preprocess"] = time.perf_counter() - start
        engine.add_request(f"ttft-{r}-{split}", inputs, SamplingParams(max_tokens=1, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
        sync(device)
        total = time.perf_counter() - start
        row = {f"{k}_ms": v * 1e3 for k, v in parts.items()} if split else {}
        row["total_ms"] = total * 1e3
        if split:
            row["rest_ms"] = row["total_ms"] - sum(v for k, v in row.items() if k != "total_ms")
        return row

    first_token(-1, False)  # warm-up
    plain = [first_token(r, False)["total_ms"] for r in range(repeats)]
    for obj, name, key in ((runner, "_encode_missing", "tower"), (runner.model, "forward", "prefill"),
                           (runner.model, "compute_logits", "lm_head")):
        wrap(obj, name, key)
    try:
        rows = [first_token(r, True) for r in range(repeats)]
    finally:
        for obj, name in ((runner, "_encode_missing"), (runner.model, "forward"), (runner.model, "compute_logits")):
            delattr(obj, name)
    keys = rows[0].keys()
    return {"total_ms": spread(plain), "split_runs": rows,
            **{k: spread([r.get(k, 0.0) for r in rows]) for k in keys}}


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "runs": values}


def speed(args, device: torch.device, copy_bw: float, report: dict, save) -> None:
    import llavakit

    log(f"loading {args.preset} ({args.dtype}, random weights)")
    pipe = llavakit.load(args.preset, dtype=args.dtype, device=str(device), load_format="dummy",
                         tokenizer=args.tokenizer)
    lm = pipe.model.language_model
    decoder_bytes = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    decoder_bytes += pipe.model.lm_head.weight.numel() * pipe.model.lm_head.weight.element_size()
    limit = copy_bw / decoder_bytes
    kv = args.kv_cache_gb * (1 << 30) if args.kv_cache_gb else None
    t0 = time.perf_counter()
    engine = bench.BenchEngine(pipe, EngineConfig(max_num_seqs=max(args.concurrent, 10), kv_cache_memory=kv,
                                          max_num_batched_tokens=args.max_num_batched_tokens))
    setup_s = time.perf_counter() - t0
    log(f"engine ready in {setup_s:.1f}s (backend {engine.runner.backend}, graphs "
        f"{engine.runner.graphs is not None}), {engine.block_manager.num_blocks} KV blocks")
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    ours = {"engine_setup_s": setup_s, "kv_blocks": engine.block_manager.num_blocks,
            "backend": engine.runner.backend, "cuda_graphs": engine.runner.graphs is not None,
            "decoder_weight_bytes": decoder_bytes, "bandwidth_limit_tokens_per_s": limit}
    report["ours"] = ours
    log(bench.protocol_name(sizes, args.output_tokens))
    ours[bench.PROTOCOL_KEY] = bench.as_rows(bench.mindie_protocol(engine, sizes, args.output_tokens))
    bs1 = ours[bench.PROTOCOL_KEY][0]
    ours["bs1_fraction_of_bandwidth_limit"] = bs1["decode_tokens_per_s"] / limit
    save()
    log("time to first token, by part")
    ours["ttft_breakdown"] = ttft_breakdown(engine, device, args.ttft_repeats)
    if engine.runner.graphs is not None and engine.runner.graphs.captured:
        g = engine.runner.graphs
        ours["bs1_graph_replay_ms"] = timed(g.graphs[1].replay, device, repeats=50) * 1e3
        ours["bs1_graph_fraction_of_bandwidth_limit"] = 1e3 / ours["bs1_graph_replay_ms"] / limit
    save()
    log(f"{args.concurrent} concurrent requests")
    bench.run_batch(engine, *concurrent_requests(args, bench.WARMUP))  # untimed, same shape, other images
    reqs, params = concurrent_requests(args, bench.TIMED)
    ours["concurrent"] = bench.as_rows([bench.run_batch(engine, reqs, params)])[0]
    ours["preemptions"] = engine.scheduler.num_preemptions
    save()
    engine.runner.release()
    del engine
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        log(f"engine freed: {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB still allocated")

    log("transformers")
    hf = hf_twin(pipe)
    theirs = {}
    report["transformers"] = theirs
    one, _ = bench.protocol_requests(1, args.output_tokens)  # the engine's timed batch-1 request
    bench.hf_generate(hf, pipe, one, [SamplingParams(max_tokens=4)], 1)  # warm-up
    # Repeated, TTFT and the full answer alternating: transformers' bs1 rate varied 4x between runs once.
    t1s, tns = [], []
    for _ in range(args.hf_repeats):
        t1s.append(bench.hf_generate(hf, pipe, one, [SamplingParams(max_tokens=1)], 1).seconds)
        tns.append(bench.hf_generate(hf, pipe, one, [SamplingParams(max_tokens=args.output_tokens)], 1).seconds)
    theirs["ttft_ms_spread"] = spread([t * 1e3 for t in t1s])
    theirs["bs1_decode_tokens_per_s_spread"] = spread([(args.output_tokens - 1) / (b - a)  # each pair's own rate
                                                       for a, b in zip(t1s, tns, strict=True)])
    theirs["ttft_ms"] = theirs["ttft_ms_spread"]["median"]
    theirs["bs1_decode_tokens_per_s"] = theirs["bs1_decode_tokens_per_s_spread"]["median"]
    save()
    theirs["padded_batches"] = []
    hf_sizes = [int(x) for x in args.hf_batch_sizes.split(",") if x] if args.hf_batch_sizes is not None else sizes
    for bs in hf_sizes:
        reqs_b, params_b = bench.protocol_requests(bs, args.output_tokens)  # what the engine ran at this size
        r = bench.hf_generate(hf, pipe, reqs_b, params_b, bs)
        theirs["padded_batches"].append({"batch_size": bs, "throughput_tokens_per_s": r.tokens_per_s,
                                         "total_s": r.seconds})
        log(f"transformers batch {bs}: {r.tokens_per_s:.1f} tokens/s")
        save()
    padded = bench.hf_generate(hf, pipe, reqs, params, len(reqs))
    theirs["concurrent_padded_tokens_per_s"] = padded.tokens_per_s
    save()
    k = args.hf_one_by_one
    single = bench.hf_generate(hf, pipe, reqs[:k], params[:k], 1)
    theirs["concurrent_one_by_one_tokens_per_s"] = single.tokens_per_s
    theirs["one_by_one_measured_on"] = k
    conc = ours["concurrent"]["throughput_tokens_per_s"]
    report["ratios"] = {
        "bs1_decode": bs1["decode_tokens_per_s"] / theirs["bs1_decode_tokens_per_s"],
        "ttft": theirs["ttft_ms"] / bs1["ttft_ms"],
        "concurrent_vs_one_by_one": conc / theirs["concurrent_one_by_one_tokens_per_s"],
        "concurrent_vs_padded_batch": conc / theirs["concurrent_padded_tokens_per_s"],
    }
    hf_rows = {t["batch_size"]: t for t in theirs["padded_batches"]}
    if hf_rows:
        report["ratios"]["per_batch_size"] = [
            o["throughput_tokens_per_s"] / hf_rows[o["batch_size"]]["throughput_tokens_per_s"]
            for o in ours[bench.PROTOCOL_KEY] if o["batch_size"] in hf_rows]
    save()


def chart(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ours, theirs = report.get("ours", {}), report.get("transformers", {})
    if bench.PROTOCOL_KEY not in ours or "padded_batches" not in theirs:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    rows = ours[bench.PROTOCOL_KEY]
    sizes = [r["batch_size"] for r in rows]
    a.plot(sizes, [r["throughput_tokens_per_s"] for r in rows], marker="o", label="llavakit")
    a.plot([r["batch_size"] for r in theirs["padded_batches"]],
           [r["throughput_tokens_per_s"] for r in theirs["padded_batches"]], marker="s", label="transformers")
    a.set_xlabel(f"batch size (one image each, {report['args']['output_tokens']} output tokens)")
    a.set_ylabel("tokens/s")
    a.set_title(f"throughput, {bench.protocol_name(sizes, report['args']['output_tokens'])}", fontsize=9)
    a.grid(alpha=0.3)
    a.legend()
    labels = ["bs1 decode", f"{report['args']['concurrent']} concurrent"]
    ours_v = [rows[0]["decode_tokens_per_s"], ours.get("concurrent", {}).get("throughput_tokens_per_s", 0)]
    theirs_v = [theirs.get("bs1_decode_tokens_per_s", 0), theirs.get("concurrent_padded_tokens_per_s", 0)]
    x = range(len(labels))
    b.bar([i - 0.2 for i in x], ours_v, width=0.4, label="llavakit")
    b.bar([i + 0.2 for i in x], theirs_v, width=0.4, label="transformers (padded batch)")
    b.axhline(ours["bandwidth_limit_tokens_per_s"], color="gray", ls="--", lw=1, label="bs1 bandwidth limit")
    b.set_xticks(list(x), labels)
    b.set_ylabel("tokens/s")
    b.set_yscale("log")
    b.legend(fontsize=8)
    b.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{report['args']['preset']} {report['args']['dtype']} on {report['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(report: dict) -> str:
    lines = []
    c = report.get("correctness", {})
    if c:
        lines.append(f"correctness: fast==torch path {c.get('fast_equals_torch_path')}, fast==transformers "
                     f"{c.get('fast_equals_transformers')}, torch path==transformers "
                     f"{c.get('torch_path_equals_transformers')} ({c.get('requests')} requests, "
                     f"{c.get('graph_steps')} graph steps)")
    ceil = report.get("ceilings", {})
    if ceil:
        lines.append(f"copy bandwidth {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
                     f"{ceil['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s")
    ours, theirs, ratios = report.get("ours", {}), report.get("transformers", {}), report.get("ratios", {})
    if bench.PROTOCOL_KEY in ours:
        lines.append(f"bs1 decode {ours[bench.PROTOCOL_KEY][0]['decode_tokens_per_s']:.1f} tok/s = "
                     f"{100 * ours['bs1_fraction_of_bandwidth_limit']:.1f}% of the bandwidth limit "
                     f"{ours['bandwidth_limit_tokens_per_s']:.1f}; one graph replay "
                     f"{ours.get('bs1_graph_replay_ms', float('nan')):.2f} ms")
        if "ttft_breakdown" in ours:
            t = ours["ttft_breakdown"]
            lines.append("TTFT, medians (min): " + ", ".join(
                f"{k[:-3]} {v['median']:.1f} ({v['min']:.1f}) ms" for k, v in t.items() if k.endswith("_ms")))
        hf_rows = {r["batch_size"]: r for r in theirs.get("padded_batches", [])}
        lines.append(f"{'batch':>5} {'TTFT ms':>9} {'decode tok/s':>13} {'tok/s':>9} {'transformers tok/s':>19}")
        for r in ours[bench.PROTOCOL_KEY]:
            hf = hf_rows.get(r["batch_size"], {}).get("throughput_tokens_per_s", float("nan"))
            lines.append(f"{r['batch_size']:>5} {r['ttft_ms']:>9.1f} {r['decode_tokens_per_s']:>13.1f} "
                         f"{r['throughput_tokens_per_s']:>9.1f} {hf:>19.1f}")
    if "concurrent" in ours:
        lines.append(f"{report['args']['concurrent']} concurrent: {ours['concurrent']['throughput_tokens_per_s']:.1f} "
                     f"tok/s, TTFT {ours['concurrent']['ttft_ms']:.0f} ms")
    for key in ("ttft_ms", "bs1_decode_tokens_per_s", "concurrent_padded_tokens_per_s",
                "concurrent_one_by_one_tokens_per_s"):
        if key in theirs:
            lines.append(f"transformers {key}: {theirs[key]:.1f}")
    for key, value in ratios.items():
        text = ", ".join(f"{v:.2f}" for v in value) if isinstance(value, list) else f"{value:.2f}"
        lines.append(f"ratio {key}: {text}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="tokenizer directory (default: the shipped LLaMA tokenizer for presets with "
                                       "a LLaMA vocabulary; Mistral and Yi presets need their own)")
    p.add_argument("--preset", default="llava-1.5-7b")
    p.add_argument("--check-preset", default="bench-small")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--output-tokens", type=int, default=256)
    p.add_argument("--batch-sizes", default="1,2,3,4,5,6,7,8,9,10")
    p.add_argument("--hf-batch-sizes", default=None,
                   help="transformers' padded batch sizes (default: --batch-sizes; '' none)")
    p.add_argument("--concurrent", type=int, default=64)
    p.add_argument("--hf-one-by-one", type=int, default=4)
    p.add_argument("--hf-repeats", type=int, default=5, help="transformers' bs1 TTFT and decode runs (min, median)")
    p.add_argument("--ttft-repeats", type=int, default=5, help="runs of the engine's TTFT breakdown")
    p.add_argument("--check-tokens", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096, help="the engine's tokens per step")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="engine KV cache size (default: free memory)")
    p.add_argument("--skip", default="", help="comma list of phases to skip: ceilings,correctness,speed")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{os.cpu_count()}c"
    import transformers

    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "date": datetime.date.today().isoformat(), "device_name": name, "torch": torch.__version__,
              "transformers": transformers.__version__, "host": platform.node()}
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    stem = args.name or f"gpu_{args.preset}_{name.replace(' ', '-')}_{report['date']}"
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))

    skip = set(filter(None, args.skip.split(",")))

    def phase(name, fn):
        """Run one phase; a failure is recorded and the next phase still runs (a GPU lease is short)."""
        if name in skip:
            return
        log(name)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - recorded in the report and printed, then the run goes on
            import traceback

            traceback.print_exc()
            report.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        save()

    try:
        phase("ceilings", lambda: report.__setitem__("ceilings", ceilings(device)))
        phase("correctness", lambda: report.__setitem__("correctness", correctness(args, device)))
        phase("speed", lambda: speed(args, device, report.get("ceilings", {}).get("copy_bytes_per_s", float("nan")),
                                     report, save))
    finally:
        save()
        ours = report.get("ours", {})
        if bench.PROTOCOL_KEY in ours:
            rows = [",".join([*ours[bench.PROTOCOL_KEY][0], "transformers_throughput_tokens_per_s"])]
            hf_rows = {r["batch_size"]: r for r in report.get("transformers", {}).get("padded_batches", [])}
            for r in ours[bench.PROTOCOL_KEY]:
                hf = hf_rows.get(r["batch_size"], {}).get("throughput_tokens_per_s", "")
                rows.append(",".join(str(x) for x in (*r.values(), hf)))
            (args.out / f"{stem}.csv").write_text("\n".join(rows) + "\n")
        chart(report, args.out / f"{stem}.png")
        print(table(report), flush=True)
        for name, error in report.get("errors", {}).items():
            print(f"phase {name} failed: {error}", flush=True)
    return 1 if report.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
