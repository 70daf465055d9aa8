"""Weight-only quantization speed on the CPU: one Linear at LLaMA-7B sizes, and bs1 decode of a small model.

Layers: (out x in) 4096x4096 and 11008x4096 at 1, 8 and 32 rows, float32 / bfloat16 against each quantized path
(the reference dequantize-then-matmul, the AVX2 kernel, torch._weight_int8pack_mm; --attempts adds
torch.compile'd fused loops). Decode: the `bench-small` preset (dummy weights) greedy at batch 1 with a
contiguous KV cache, float32 / bfloat16 / w8a16 / w4a16, LM head float and (--quantize-lm-head rows) quantized.
Prefill: the same layers at 64, 256 and 512 rows, float against the reference and the blocked many-row path.
Runs are interleaved (one of each candidate per round) so load from other processes hits them alike; min and
median are reported. Writes JSON and a PNG under --out, named with the date and machine.

    python benchmarks/quant_bench.py [--threads 2] [--rounds 15] [--decode-tokens 64] [--attempts] [--out DIR]
    python benchmarks/quant_bench.py --rounds 3 --decode-tokens 8 --out /tmp/bench  # smoke run
    python benchmarks/quant_bench.py --parts prefill --rounds 7   # one part: written as quant_bench_prefill_...
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llavakit.quant import QuantConfig, formats, kernels, quantize

LAYERS = [(4096, 4096), (11008, 4096)]
ROWS = [1, 8, 32]
PREFILL_ROWS = [64, 256, 512]
PARTS = ("layers", "decode", "prefill")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def interleaved(cands: dict, rounds: int) -> dict[str, dict[str, float]]:
    """ms per call of each candidate (min, median), one call of each per round after one warm-up call."""
    for f in cands.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(rounds):
        for k, f in cands.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"min_ms": round(min(v), 3), "median_ms": round(statistics.median(v), 3)} for k, v in times.items()}


def candidates(out: int, k: int, rows: int, name: str, fits, fast) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """float32 and bfloat16 F.linear, and for W8A16 and W4A16 the reference and the fast path `fast` (labelled
    `name`) where `fits(x, packed, cfg)`; with the float weight and input they were built from."""
    w = torch.randn(out, k) * 0.02
    x = torch.randn(rows, k)
    wb, xb = w.bfloat16(), x.bfloat16()
    cands = {"float32": lambda: F.linear(x, w), "bfloat16": lambda: F.linear(xb, wb)}
    for cfg in (QuantConfig("w8a16"), QuantConfig("w4a16")):
        t = formats.quantize_weight(w, cfg)
        p, s = t["weight_packed"], t["weight_scale"]
        cands[f"{cfg.method} reference"] = lambda p=p, s=s, cfg=cfg: kernels.reference(x, p, s, None, cfg)
        if fits(x, p, cfg):
            cands[f"{cfg.method} {name}"] = lambda p=p, s=s, cfg=cfg: fast(x, p, s, None, cfg)
    return cands, w, x


def layer_candidates(out: int, k: int, rows: int, attempts: bool) -> dict:
    cands, w, x = candidates(out, k, rows, "avx2 kernel", lambda x, p, cfg: kernels.cpu_kernel_fits(x, p, cfg)
                             or rows > kernels.CPU_KERNEL_MAX_ROWS, kernels.cpu_kernel)
    q8 = formats.unpack_weight(formats.quantize_weight(w, QuantConfig("w8a16")), QuantConfig("w8a16"))
    s8 = formats.compute_scale(w, QuantConfig("w8a16")).squeeze(1)
    cands["w8a16 torch._weight_int8pack_mm"] = lambda: torch._weight_int8pack_mm(x, q8, s8)
    if attempts:
        fused = torch.compile(lambda x, q, s: (x.unsqueeze(-2) * q.to(x.dtype)).sum(-1) * s, dynamic=False)
        cands["w8a16 torch.compile fused loop"] = lambda: fused(x, q8, s8)
    return cands


def layer_bench(rounds: int, attempts: bool) -> list[dict]:
    results = []
    for out, k in LAYERS:
        for rows in ROWS:
            with torch.no_grad():
                timing = interleaved(layer_candidates(out, k, rows, attempts), rounds)
            results.append({"out_features": out, "in_features": k, "rows": rows, "timings": timing})
            print(f"{out}x{k} rows={rows}: " + ", ".join(f"{n} {t['median_ms']:.2f}" for n, t in timing.items()))
    return results


def prefill_candidates(out: int, k: int, rows: int) -> dict:
    return candidates(out, k, rows, "blocked", kernels.cpu_blocked_fits, kernels.cpu_blocked)[0]


def prefill_bench(rounds: int) -> list[dict]:
    results = []
    for out, k in LAYERS:
        for rows in PREFILL_ROWS:
            with torch.no_grad():
                timing = interleaved(prefill_candidates(out, k, rows), rounds)
            results.append({"out_features": out, "in_features": k, "rows": rows, "timings": timing})
            print(f"{out}x{k} rows={rows}: " + ", ".join(f"{n} {t['median_ms']:.1f}" for n, t in timing.items()))
    return results


def decode_tokens_per_s(model, tokens: int, prompt: int = 32) -> float:
    """Greedy bs1 decode with a contiguous KV cache; decode tokens per second (prefill excluded)."""
    from llavakit.layers.attention import AttentionMetadata, KVCache

    t = model.cfg.text
    dtype = model.language_model.embed_tokens.weight.dtype
    cache = KVCache(t.num_hidden_layers, 1, t.num_key_value_heads, prompt + tokens + 1, t.head_dim, dtype, "cpu")
    ids = torch.randint(0, 32000, (1, prompt))
    hidden = model(model.embed_inputs(ids), torch.arange(prompt)[None], cache)
    start = time.perf_counter()
    for pos in range(prompt, prompt + tokens):
        token = model.compute_logits(hidden[0, -1:]).argmax(-1).view(1, 1)
        hidden = model(model.embed_inputs(token), torch.tensor([[pos]]), cache, AttentionMetadata(start_pos=pos))
    return tokens / (time.perf_counter() - start)


def decode_bench(tokens: int, rounds: int) -> dict:
    import copy

    from llavakit.presets import preset_config
    from llavakit.weights.loader import random_llava

    cfg = preset_config("bench-small")
    base = random_llava(cfg, torch.float32, torch.device("cpu"))
    # bench-small's MLP is 1376 wide: 32 is the largest power-of-two group that divides it
    models = {"float32": base, "bfloat16": copy.deepcopy(base).bfloat16()}
    for name, qcfg in [("w8a16", QuantConfig("w8a16")), ("w4a16 g32", QuantConfig("w4a16", 32)),
                       ("w8a16 +lm_head", QuantConfig("w8a16", lm_head=True)),
                       ("w4a16 g32 +lm_head", QuantConfig("w4a16", 32, lm_head=True))]:
        models[name] = quantize(copy.deepcopy(base), qcfg)
    rates: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            decode_tokens_per_s(m, 4)  # warm-up
        for _ in range(rounds):
            for k, m in models.items():
                rates[k].append(decode_tokens_per_s(m, tokens))
    result = {k: {"max_tok_s": round(max(v), 2), "median_tok_s": round(statistics.median(v), 2)}
              for k, v in rates.items()}
    for k, v in result.items():
        print(f"decode bench-small bs1 {k}: {v['median_tok_s']:.1f} tok/s (best {v['max_tok_s']:.1f}), "
              f"{v['median_tok_s'] / result['float32']['median_tok_s']:.2f}x float32")
    return result


def chart(report: dict, path: Path) -> bool:
    """The PNG of a run with layers and decode; False (nothing written) for a run of other parts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "layers" not in report or "decode" not in report:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    one_row = [r for r in report["layers"] if r["rows"] == 1]
    names = list(one_row[0]["timings"])
    for i, r in enumerate(one_row):
        a.bar([j + i * 0.4 for j in range(len(names))], [r["timings"][n]["median_ms"] for n in names], 0.4,
              label=f"{r['out_features']}x{r['in_features']}")
    a.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    a.set_ylabel("ms per call (median), 1 row")
    a.set_yscale("log")
    a.legend()
    dec = report["decode"]
    b.bar(list(dec), [v["median_tok_s"] for v in dec.values()])
    b.set_xticks(range(len(dec)), list(dec), rotation=35, ha="right", fontsize=8)
    b.set_ylabel("bench-small bs1 decode tokens/s (median)")
    fig.suptitle(f"{report['machine']}, {report['threads']} threads, {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--attempts", action="store_true", help="also time torch.compile'd fused loops (slow build)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    report = {"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()}-core CPU {cpu_name()}",
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
              "threads": args.threads, "rounds": args.rounds, "protocol": "interleaved rounds, min and median"}
    parts = [part for part in PARTS if part in args.parts.split(",")]
    if "layers" in parts:
        report["layers"] = layer_bench(args.rounds, args.attempts)
    if "decode" in parts:
        report["decode"] = decode_bench(args.decode_tokens, args.rounds)
        report["decode_tokens"] = args.decode_tokens
    if "prefill" in parts:
        report["prefill"] = prefill_bench(args.rounds)
    report["load_average"] = {"before": load_before, "after": os.getloadavg()}
    args.out.mkdir(parents=True, exist_ok=True)
    label = "" if len(parts) == len(PARTS) else "_" + "-".join(parts)  # a partial run keeps the full one's file
    name = f"quant_bench{label}_cpu-{os.cpu_count()}c_{report['date']}"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    png = chart(report, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.json" + (" and .png" if png else ""))


if __name__ == "__main__":
    main()
