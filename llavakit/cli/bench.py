"""`llavakit bench`: the engine's speed (MindIE's performance protocol: batch 1-10 x 256 tokens; offline
throughput) and transformers' on the same weights and the same requests, to CSV, JSON and a PNG chart.
Every shape is warmed up untimed first and every request has its own image (see llavakit.eval.bench)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
from pathlib import Path

from llavakit.cli.common import (
    UsageError,
    add_image_aspect_ratio_flag,
    add_parallel_flag,
    add_quantization_flags,
    add_threads_flag,
    number,
    quantization_arg,
    set_threads,
)

HELP = "measure serving speed (batch 1..10 x 256 tokens, offline throughput) against transformers"
EXAMPLE = """examples:
  llavakit bench --model DIR --compare-transformers
  llavakit bench --model llava-1.5-7b --load-format dummy --device cuda --dtype bfloat16
  llavakit bench --model bench-small --load-format dummy --compare-transformers --repeats 3
  llavakit bench --model DIR --batch-sizes 1,2,4 --output-tokens 64 --requests 16 --distinct-images 4
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="checkpoint, alias, or a preset name with --load-format dummy")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--tokenizer", help="tokenizer directory for --load-format dummy (default: the LLaMA tokenizer "
                                       "shipped with llavakit, for presets with a LLaMA vocabulary)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    add_quantization_flags(p)
    add_parallel_flag(p)
    add_image_aspect_ratio_flag(p)
    add_threads_flag(p)
    p.add_argument("--batch-sizes", default="1,2,3,4,5,6,7,8,9,10",
                   help="batch sizes of MindIE's performance protocol (one image per request)")
    p.add_argument("--output-tokens", type=int, default=256)
    p.add_argument("--requests", type=int, default=32, help="offline-throughput requests")
    p.add_argument("--distinct-images", type=number(int, 1), metavar="N",
                   help="reuse images: each batch holds at most N distinct images (default: one per request). "
                        "The engine encodes a repeated image once, transformers every time: a run with reuse "
                        "flatters the engine")
    p.add_argument("--repeats", type=number(int, 1), default=1, metavar="N",
                   help="rounds of engine then transformers, each on fresh images; medians and min/max reported")
    p.add_argument("--compare-transformers", action="store_true", help="also run transformers' generate")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where results go")
    p.add_argument("--name", default=None, help="result file stem (default: engine_<model>_<device>_<date>)")


def run(args: argparse.Namespace) -> int:
    import llavakit
    from llavakit.eval import bench

    quantization = quantization_arg(args)  # usage errors before the model loads
    if quantization is not None and args.compare_transformers:
        raise UsageError("--compare-transformers runs transformers on the same float weights; drop --quantization")
    if args.tensor_parallel_size > 1 and args.compare_transformers:
        raise UsageError("--compare-transformers runs transformers on one device; drop --tensor-parallel-size")
    threads = set_threads(args)
    pipe = llavakit.load(args.model, dtype=args.dtype, device=args.device, load_format=args.load_format,
                         tokenizer=args.tokenizer, image_aspect_ratio=args.image_aspect_ratio,
                         quantization=quantization, tensor_parallel_size=args.tensor_parallel_size)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    hf = _transformers(pipe, args) if args.compare_transformers else None  # before the engine sizes its cache
    engine = bench.engine_for(pipe, max_num_seqs=max(args.requests, *sizes),  # every run fits at once
                              max_model_len=bench.needed_model_len(pipe, args.output_tokens))
    load_before = _load_average()
    suite = bench.run_suite(engine, sizes, args.output_tokens, args.requests, repeats=args.repeats,
                            distinct_images=args.distinct_images, hf=hf,
                            log=lambda msg: print(msg, file=sys.stderr, flush=True))
    cpus = os.cpu_count()
    report = {"model": str(args.model), "device": str(pipe.device), "dtype": str(pipe.model.dtype),
              "quantization": None if quantization is None else dataclasses.asdict(quantization),
              "date": datetime.date.today().isoformat(), "host": platform.processor() or platform.machine(),
              "machine": f"{cpus}-core CPU {_cpu_name()}".strip(), "cpu_count": cpus, "threads": threads,
              "protocol": bench.protocol_name(sizes, args.output_tokens), "output_tokens": args.output_tokens,
              "batch_sizes": sizes, "repeats": args.repeats,
              "distinct_images": args.distinct_images or "one per request",
              "warmup": "an untimed run of each shape (batch size, prompts, lengths) on other images before its "
                        "first timed run",
              "kv_blocks": engine.block_manager.num_blocks, "max_model_len": engine.max_model_len,
              "load_average": {"before": load_before, "after": _load_average()},  # 1, 5 and 15 minutes
              bench.PROTOCOL_KEY: suite.protocol(), "offline": suite.offline()}
    hf_medians = suite.transformers()
    if hf_medians is not None:
        report["transformers"] = {**hf_medians, **{k: v["median"] for k, v in suite.ratios().items()}}
        report["ratios"] = suite.ratios()
    report["summary"] = suite.summary()
    report["rounds"] = suite.rounds
    _write(report, args)
    return 0


def _transformers(pipe, args):
    """transformers' model on the same weights: the checkpoint itself, or (dummy weights) a twin sharing the
    engine model's tensors."""
    from llavakit.eval import bench

    print("loading transformers' model ...", file=sys.stderr, flush=True)
    if args.load_format == "dummy":
        return bench.hf_twin(pipe)
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(pipe.config.name_or_path, dtype=pipe.model.dtype)
    return hf.to(pipe.device).eval()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _write(report: dict, args) -> None:
    from llavakit.eval.bench import PROTOCOL_KEY

    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu-%dc" % os.cpu_count() if report["device"] == "cpu" else report["device"]
    stem = args.name or f"engine_{Path(str(args.model)).name}_{device}_{report['date']}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    fields = ["batch_size", "ttft_ms", "decode_tokens_per_s", "throughput_tokens_per_s", "total_s",
              "distinct_images", "images_encoded"]
    lines = [",".join(["round", "workload", *fields])]  # one row per timed run
    for i, rnd in enumerate(report["rounds"]):
        for workload, rows in ((PROTOCOL_KEY, rnd[PROTOCOL_KEY]), ("offline", [rnd["offline"]])):
            lines += [",".join([str(i + 1), workload] + [f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k])
                                                         for k in fields]) for r in rows]
    (args.out / f"{stem}.csv").write_text("\n".join(lines) + "\n")
    rows = report[PROTOCOL_KEY]
    _chart(report, args.out / f"{stem}.png")
    many = report["repeats"] > 1
    print(report["protocol"] + (f", medians of {report['repeats']} rounds" if many else ""))
    print(f"{'batch':>5} {'TTFT ms':>9} {'decode tok/s':>13} {'throughput tok/s':>17} "
          f"{'images (distinct/encoded)':>26}")
    for r in rows:
        print(f"{r['batch_size']:>5} {r['ttft_ms']:>9.1f} {r['decode_tokens_per_s']:>13.1f} "
              f"{r['throughput_tokens_per_s']:>17.1f} {r['distinct_images']:>15}/{r['images_encoded']}")
    off, summary = report["offline"], report["summary"]
    spread = summary["offline_tokens_per_s"]
    print(f"offline: {off['requests']} requests, {off['throughput_tokens_per_s']:.1f} tokens/s"
          + (f" (min {spread['min']:.1f}, max {spread['max']:.1f})" if many else "")
          + f", {off['distinct_images']} distinct images, {off['images_encoded']} encoded by the engine")
    for key, value in report.get("transformers", {}).items():
        extra = summary.get(f"transformers_{key}") or report.get("ratios", {}).get(key)
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        if many and extra:
            text += f" (min {extra['min']:.2f}, max {extra['max']:.2f})"
        print(f"transformers {key}: {text}")
    print(f"results: {args.out / stem}.{{json,csv,png}}", file=sys.stderr)


def _chart(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return
    from llavakit.eval.bench import PROTOCOL_KEY

    rows = report[PROTOCOL_KEY]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = [r["batch_size"] for r in rows]
    for key, marker, label in (("throughput_tokens_per_s", "o", "throughput"), ("decode_tokens_per_s", "s", "decode")):
        a.plot(sizes, [r[key] for r in rows], marker=marker, label=label)
        if report["repeats"] > 1:  # the band between the rounds' lowest and highest
            runs = [[rnd[PROTOCOL_KEY][i][key] for rnd in report["rounds"]] for i in range(len(rows))]
            a.fill_between(sizes, [min(v) for v in runs], [max(v) for v in runs], alpha=0.2)
    a.set_xlabel("batch size (one image each)")
    a.set_ylabel("tokens/s")
    a.legend()
    a.grid(alpha=0.3)
    b.plot(sizes, [r["ttft_ms"] for r in rows], marker="o", color="tab:red")
    b.set_xlabel("batch size")
    b.set_ylabel("time to first token (ms)")
    b.grid(alpha=0.3)
    threads = f", {report['threads']} thread{'s' if report['threads'] != 1 else ''}" if report.get("threads") else ""
    fig.suptitle(f"llavakit engine, {report['protocol']} ({report['device']}{threads}, {report['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
