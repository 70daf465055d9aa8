"""Weight-only quantization on a GPU: kernels, decode speed against each method's bandwidth limit, memory.

    python benchmarks/gpu_quant_bench.py [--out DIR]          # an H100: about 6 minutes in one call
    python benchmarks/gpu_quant_bench.py --smoke --out /tmp/q  # the same phases on the CPU with bench-small

Phases, in order; each one's results are written to <out>/<name>.json as it ends (a run cut short keeps them):
1. ceilings: device-to-device copy bandwidth (bytes read + written per second), as gpu_bench.py measures it;
2. kernels: one layer at LLaMA-7B sizes at several row counts: the float matmul, each quantized path that
   `quant_linear` can take (torch's `_weight_int8pack_mm`, tinygemm's `_weight_int4pack_mm` on the repacked
   weight, the dequantize-then-matmul reference) with its largest difference from the reference: the numbers
   that set kernels.CUDA_MAX_ROWS and decide each method's GPU path;
3. per method (float = bf16 on the GPU, w8a16, w4a16 group 128) the `--preset` model with random weights
   (load_format="dummy") through the engine: bs1 decode tokens/s and its fraction of the method's own bandwidth
   limit (copy bandwidth / the decoder's weight bytes as stored: packed weights and scales), one captured decode
   step's time, then `--concurrent` requests at once (one image each, `--output-tokens` each): throughput;
   memory after loading and the peak, and how much of the stored quantized weight moved to the host;
4. memory: `--memory-preset` (llava-v1.6-34b) built in w4a16 and w8a16: torch.cuda.max_memory_allocated after
   loading, and after every quantized layer ran once. Each layer's GPU kernel repacks the weight for itself and
   the stored one moves to the host, so `repack_growth_gib` (allocated after first use minus after loading) stays
   near zero (tinygemm's bf16 scales) where keeping both copies would add `quantized_weight_gib`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_bench import ceilings, log, timed  # noqa: E402

from llavakit.config import EngineConfig  # noqa: E402
from llavakit.eval import bench  # noqa: E402
from llavakit.quant import QuantConfig, formats, kernels  # noqa: E402
from llavakit.quant.linear import FusedQuantProduct, QuantLinear  # noqa: E402

GPU = dict(preset="llava-1.5-7b", dtype="bfloat16", layers=[(4096, 4096), (11008, 4096), (4096, 11008)],
           rows=[1, 8, 16, 32, 64, 128, 256], output_tokens=256, concurrent=64, memory_preset="llava-v1.6-34b",
           group_size=128)
SMOKE = dict(preset="bench-small", dtype="float32", layers=[(256, 256)], rows=[1, 64], output_tokens=4,
             concurrent=2, memory_preset=None, group_size=32)  # bench-small's MLP is 1376 wide: 43 groups of 32


def method_configs(group_size: int) -> dict[str, QuantConfig | None]:
    return {"float": None, "w8a16": QuantConfig("w8a16"), "w4a16": QuantConfig("w4a16", group_size)}


def gib(n: float) -> float:
    return round(n / 2**30, 3)


def kernel_rows(device: torch.device, dtype: torch.dtype, layers, rows, methods: dict) -> list[dict]:
    """ms per call (median) of every path for each layer and row count, and each path's error."""
    results = []
    for out, k in layers:
        w = torch.randn(out, k, device=device, dtype=dtype) * 0.02
        for n in rows:
            x = torch.randn(n, k, device=device, dtype=dtype)
            row = {"out": out, "in": k, "rows": n, "float_ms": timed(lambda x=x, w=w: F.linear(x, w), device) * 1e3}
            for name, cfg in methods.items():
                if cfg is not None:
                    row.update(_quantized_paths(name, cfg, w, x, device))
            results.append(row)
            log(f"kernels {out}x{k} rows {n}: " + ", ".join(f"{key} {v:.3f}" for key, v in row.items()
                                                            if key.endswith("_ms")))
    return results


@torch.no_grad()
def _quantized_paths(name: str, cfg: QuantConfig, w: torch.Tensor, x: torch.Tensor, device) -> dict:
    t = formats.quantize_weight(w, cfg)
    packed, scale = t["weight_packed"], t["weight_scale"]
    row = {f"{name}_reference_ms": timed(lambda: kernels.reference(x, packed, scale, None, cfg), device) * 1e3}
    p = kernels.prepare(packed, scale, cfg, x.dtype)
    if p is not None:
        ref = kernels.reference(x, packed, scale, None, cfg).float()
        try:
            diff = kernels.run_prepared(x, p, None).float() - ref
            row[f"{name}_{p.kind}pack_max_abs_diff"] = diff.abs().max().item()
            row[f"{name}_{p.kind}pack_ms"] = timed(lambda: kernels.run_prepared(x, p, None), device) * 1e3
        except (RuntimeError, NotImplementedError) as e:  # an op this torch build lacks: recorded
            row[f"{name}_{p.kind}pack_error"] = str(e).splitlines()[0][:200]
    return row


def weight_bytes(model) -> int:
    """Bytes one decode step reads from the decoder and LM head as stored (packed weights, scales, norms)."""
    total = 0
    for part in (model.language_model, model.lm_head):
        for name, t in [*part.named_parameters(), *part.named_buffers()]:
            if "embed_tokens" not in name:
                total += t.numel() * t.element_size()
    return total


def stored_bytes(model, on_host: bool) -> int:
    """Bytes of the quantized layers' stored `weight_packed` on the host (released by their GPU kernels) or not."""
    return sum(m.weight_packed.numel() * m.weight_packed.element_size() for m in model.modules()
               if isinstance(m, QuantLinear) and (m.weight_packed.device == kernels.HOST) == on_host)


def repacked_products(model) -> int:
    """Quantized products holding a weight repacked for a GPU kernel: layers and fused q/k/v, gate/up products."""
    owners = [m for m in model.modules() if isinstance(m, QuantLinear)]
    owners += [f for m in model.modules() for f in vars(m).values() if isinstance(f, FusedQuantProduct)]
    return sum(o.repacked.get("cuda", (None,))[-1] is not None for o in owners)


def method_run(args, name: str, cfg: QuantConfig | None, device: torch.device, copy_bw: float) -> dict:
    import llavakit

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pipe = llavakit.load(args.preset, dtype=args.dtype, device=str(device), load_format="dummy",
                         quantization=cfg)
    res = {"weight_bytes": weight_bytes(pipe.model)}
    res["bandwidth_limit_tokens_per_s"] = copy_bw / res["weight_bytes"]
    if device.type == "cuda":
        res["allocated_after_load_gib"] = gib(torch.cuda.memory_allocated(device))
    engine = bench.BenchEngine(pipe, EngineConfig(max_num_seqs=max(args.concurrent, 1),
                                                  max_model_len=bench.needed_model_len(pipe, args.output_tokens)))
    bs1 = bench.as_rows(bench.mindie_protocol(engine, [1], args.output_tokens))[0]
    res["bs1"] = bs1
    res["bs1_fraction_of_bandwidth_limit"] = bs1["decode_tokens_per_s"] / res["bandwidth_limit_tokens_per_s"]
    graphs = engine.runner.graphs
    if graphs is not None and graphs.captured:
        res["bs1_graph_replay_ms"] = timed(graphs.graphs[1].replay, device, repeats=50) * 1e3
        res["bs1_graph_fraction_of_bandwidth_limit"] = 1e3 / res["bs1_graph_replay_ms"] / \
            res["bandwidth_limit_tokens_per_s"]
    res["repacked_products"] = repacked_products(pipe.model)
    bench.run_batch(engine, *bench.protocol_requests(args.concurrent, args.output_tokens, purpose=bench.WARMUP))
    conc = bench.run_batch(engine, *bench.protocol_requests(args.concurrent, args.output_tokens))
    res["concurrent"] = bench.as_rows([conc])[0]
    if device.type == "cuda":
        res["peak_allocated_gib"] = gib(torch.cuda.max_memory_allocated(device))
        res["stored_on_host_gib"] = gib(stored_bytes(pipe.model, True))
        res["stored_on_gpu_gib"] = gib(stored_bytes(pipe.model, False))
    log(f"{name}: bs1 {bs1['decode_tokens_per_s']:.1f} tok/s = {100 * res['bs1_fraction_of_bandwidth_limit']:.0f}% "
        f"of {res['bandwidth_limit_tokens_per_s']:.0f}; {args.concurrent} concurrent "
        f"{conc.throughput_tokens_per_s:.0f} tok/s")
    engine.runner.release()
    del engine, pipe
    _free(device)
    return res


@torch.no_grad()
def memory_run(preset: str, cfg: QuantConfig, dtype: torch.dtype, device: torch.device) -> dict:
    """Peak memory of building `preset` quantized with random weights, then after each quantized layer ran once."""
    from llavakit.presets import preset_config
    from llavakit.weights.loader import random_llava

    torch.cuda.reset_peak_memory_stats(device)
    model = random_llava(preset_config(preset), dtype, device, quantization=cfg)
    loaded = torch.cuda.memory_allocated(device)
    res = {"after_load_max_allocated_gib": gib(torch.cuda.max_memory_allocated(device)),
           "after_load_allocated_gib": gib(loaded), "quantized_weight_gib": gib(stored_bytes(model, False))}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m(torch.zeros(1, m.in_features, device=device, dtype=dtype))
    res["after_first_use_max_allocated_gib"] = gib(torch.cuda.max_memory_allocated(device))
    res["after_first_use_allocated_gib"] = gib(torch.cuda.memory_allocated(device))
    res["repack_growth_gib"] = gib(torch.cuda.memory_allocated(device) - loaded)
    res["repacked_products"] = repacked_products(model)
    res["stored_on_host_gib"] = gib(stored_bytes(model, True))
    res["total_gib"] = gib(torch.cuda.get_device_properties(device).total_memory)
    log(f"{preset} {cfg.method}: {res}")
    del model
    _free(device)
    return res


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="bench-small on the CPU, a few tokens: proves the script")
    p.add_argument("--methods", default="float,w8a16,w4a16", help="float: the --dtype model unquantized")
    p.add_argument("--skip", default="", help="comma list of phases to skip: ceilings,kernels,methods,memory")
    p.add_argument("--output-tokens", type=int)
    p.add_argument("--concurrent", type=int)
    p.add_argument("--out", type=Path, default=None, help="default: $OUT if set, else benchmarks/results")
    args = p.parse_args()
    setup = SMOKE if args.smoke else GPU
    for key, value in setup.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = getattr(torch, args.dtype)
    import os

    out = args.out or Path(os.environ.get("OUT") or "benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{os.cpu_count()}c"
    report = {"date": datetime.date.today().isoformat(), "device_name": name, "torch": torch.__version__,
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    path = out / f"gpu_quant_{args.preset}_{name.replace(' ', '-')}_{report['date']}.json"

    def save() -> None:
        path.write_text(json.dumps(report, indent=1))

    skip = set(filter(None, args.skip.split(",")))

    def phase(key: str, fn) -> None:
        """Run one phase and save; a failure is recorded and the next phase still runs (a GPU lease is short)."""
        if key.split(" ")[0] in skip:
            return
        log(key)
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - recorded in the report and printed, then the run goes on
            import traceback

            traceback.print_exc()
            report.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"
        report.setdefault("phase_seconds", {})[key] = round(time.perf_counter() - t0, 1)
        save()

    phase("ceilings", lambda: report.__setitem__("ceilings", ceilings(device)))
    copy_bw = report.get("ceilings", {}).get("copy_bytes_per_s", float("nan"))
    configs = method_configs(args.group_size)
    phase("kernels", lambda: report.__setitem__("kernels", kernel_rows(device, dtype, args.layers, args.rows,
                                                                       configs)))
    report["methods"] = {}
    for m in args.methods.split(","):
        phase(f"methods {m}", lambda m=m: report["methods"].__setitem__(
            m, method_run(args, m, configs[m], device, copy_bw)))
    if device.type == "cuda" and args.memory_preset:
        report["memory"] = {}
        for m in ("w4a16", "w8a16"):
            phase(f"memory {m}", lambda m=m: report["memory"].__setitem__(
                f"{args.memory_preset}-{m}", memory_run(args.memory_preset, configs[m], dtype, device)))
    base = report["methods"].get("float", {}).get("bs1", {}).get("decode_tokens_per_s")
    if base:
        report["bs1_speedup_vs_float"] = {m: r["bs1"]["decode_tokens_per_s"] / base
                                         for m, r in report["methods"].items() if "bs1" in r}
    save()
    print(json.dumps({k: report.get(k) for k in ("bs1_speedup_vs_float", "memory", "errors")}, indent=1))
    print(f"written: {path}")
    return 1 if report.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
