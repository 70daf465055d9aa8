"""`llavakit bench`: the engine's speed (seed-004 protocol, offline throughput) and transformers' on the
same weights, to CSV, JSON and a PNG chart."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

HELP = "measure serving speed (batch 1..10 x 256 tokens, offline throughput) against transformers"
EXAMPLE = """examples:
  llavakit bench --model DIR --compare-transformers
  llavakit bench --model llava-1.5-7b --load-format dummy --tokenizer llama-tokenizer/ --device cuda --dtype bfloat16
  llavakit bench --model DIR --batch-sizes 1,2,4 --output-tokens 64 --requests 16
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="checkpoint, alias, or a preset name with --load-format dummy")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--tokenizer", help="tokenizer directory (needed with --load-format dummy)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", default="1,2,3,4,5,6,7,8,9,10", help="seed-004 batch sizes")
    p.add_argument("--output-tokens", type=int, default=256)
    p.add_argument("--requests", type=int, default=32, help="offline-throughput requests")
    p.add_argument("--compare-transformers", action="store_true", help="also run transformers' generate")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where results go")
    p.add_argument("--name", default=None, help="result file stem (default: engine_<model>_<device>_<date>)")


def run(args: argparse.Namespace) -> int:
    import llavakit
    from llavakit.eval import bench

    pipe = llavakit.load(args.model, dtype=args.dtype, device=args.device, load_format=args.load_format,
                         tokenizer=args.tokenizer)
    engine = bench.engine_for(pipe, max_num_seqs=64)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    print("seed-004 protocol ...", file=sys.stderr)
    protocol = bench.seed004(engine, sizes, args.output_tokens)
    reqs, params = bench.mixed_workload(args.requests, max_out=args.output_tokens)
    print("offline throughput ...", file=sys.stderr)
    encoded_before = engine.runner.images_encoded
    offline = bench.run_batch(engine, reqs, params)
    report = {"model": str(args.model), "device": str(pipe.device), "dtype": str(pipe.model.lm_head.weight.dtype),
              "date": datetime.date.today().isoformat(), "host": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "seed004": bench.as_rows(protocol),
              "offline": {"requests": args.requests, **bench.as_rows([offline])[0],
                          "images_encoded": engine.runner.images_encoded - encoded_before,
                          "distinct_images": len({id(r["images"][0]) for r in reqs})}}
    if args.compare_transformers:
        report["transformers"] = _compare(pipe, reqs, params, protocol, offline, args)
    _write(report, args)
    return 0


def _compare(pipe, reqs, params, protocol, offline, args) -> dict:
    from transformers import AutoModelForImageTextToText

    from llavakit.eval import bench
    from llavakit.sampling import SamplingParams

    print("transformers ...", file=sys.stderr)
    hf = AutoModelForImageTextToText.from_pretrained(pipe.config.name_or_path, dtype=pipe.model.lm_head.weight.dtype)
    hf = hf.to(pipe.device).eval()
    one = [reqs[0]]
    t1 = bench.hf_generate(hf, pipe, one, [SamplingParams(max_tokens=1)], 1).seconds
    tn = bench.hf_generate(hf, pipe, one, [SamplingParams(max_tokens=args.output_tokens)], 1).seconds
    hf_decode = (args.output_tokens - 1) / (tn - t1)
    single = bench.hf_generate(hf, pipe, reqs, params, 1)
    padded = bench.hf_generate(hf, pipe, reqs, params, len(reqs))
    ours_bs1 = protocol[0].decode_tokens_per_s if protocol and protocol[0].batch_size == 1 else None
    return {"bs1_decode_tokens_per_s": hf_decode, "one_by_one_tokens_per_s": single.tokens_per_s,
            "padded_batch_tokens_per_s": padded.tokens_per_s,
            "ratio_bs1_decode": ours_bs1 / hf_decode if ours_bs1 else None,
            "ratio_vs_one_by_one": offline.throughput_tokens_per_s / single.tokens_per_s,
            "ratio_vs_padded_batch": offline.throughput_tokens_per_s / padded.tokens_per_s}


def _write(report: dict, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu-%dc" % os.cpu_count() if report["device"] == "cpu" else report["device"]
    stem = args.name or f"engine_{Path(str(args.model)).name}_{device}_{report['date']}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    rows = report["seed004"]
    lines = ["batch_size,ttft_ms,decode_tokens_per_s,throughput_tokens_per_s,total_s"]
    lines += [",".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in r) for r in rows]
    (args.out / f"{stem}.csv").write_text("\n".join(lines) + "\n")
    _chart(rows, args.out / f"{stem}.png")
    print(f"{'batch':>5} {'TTFT ms':>9} {'decode tok/s':>13} {'throughput tok/s':>17}")
    for r in rows:
        print(f"{r['batch_size']:>5} {r['ttft_ms']:>9.1f} {r['decode_tokens_per_s']:>13.1f} "
              f"{r['throughput_tokens_per_s']:>17.1f}")
    off = report["offline"]
    print(f"offline: {off['requests']} requests, {off['throughput_tokens_per_s']:.1f} tokens/s, "
          f"{off['images_encoded']} images encoded")
    for key, value in report.get("transformers", {}).items():
        print(f"transformers {key}: {value:.2f}" if isinstance(value, float) else f"transformers {key}: {value}")
    print(f"results: {args.out / stem}.{{json,csv,png}}", file=sys.stderr)


def _chart(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = [r["batch_size"] for r in rows]
    a.plot(sizes, [r["throughput_tokens_per_s"] for r in rows], marker="o", label="throughput")
    a.plot(sizes, [r["decode_tokens_per_s"] for r in rows], marker="s", label="decode")
    a.set_xlabel("batch size")
    a.set_ylabel("tokens/s")
    a.legend()
    a.grid(alpha=0.3)
    b.plot(sizes, [r["ttft_ms"] for r in rows], marker="o", color="tab:red")
    b.set_xlabel("batch size")
    b.set_ylabel("time to first token (ms)")
    b.grid(alpha=0.3)
    fig.suptitle("llavakit engine, seed-004 protocol")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
