"""Where a decode step's GPU time goes: torch.profiler over replays of the engine's captured decode graph.

    python benchmarks/profile_decode.py [--preset llava-1.5-7b] [--batch 1,8] [--steps 20] [--variants]

Loads the preset with random weights, prefills `--batch` one-image requests, then profiles `--steps`
replays of that batch's decode graph and prints the kernels by total GPU time (and the sum), next to
the time of one replay measured with CUDA events. Needs CUDA.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import llavakit
    from llavakit.config import EngineConfig
    from llavakit.eval import bench
    from llavakit.sampling import SamplingParams

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="default: the shipped LLaMA tokenizer (presets with a LLaMA vocabulary)")
    p.add_argument("--preset", default="llava-1.5-7b")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--variants", action="store_true",
                   help="also time one replay with each optimisation switched off in turn")
    args = p.parse_args()
    pipe = llavakit.load(args.preset, dtype="bfloat16", device="cuda", load_format="dummy", tokenizer=args.tokenizer)
    if args.variants:
        variants(pipe, args)
    engine = bench.BenchEngine(pipe, EngineConfig(max_num_seqs=64, kv_cache_memory=24 << 30))
    graphs = engine.runner.graphs
    for b in (int(x) for x in args.batch.split(",")):
        reqs = [{"prompt": bench.QUESTIONS[0], "images": [bench.noise(100 + i)]} for i in range(b)]
        for i, r in enumerate(reqs):
            engine.submit(f"p{b}-{i}", r, SamplingParams(max_tokens=40, ignore_eos=True))
        for _ in range(12):  # prefill, then a few decode steps: the buffers now hold this batch
            engine.step()
        bucket = graphs.bucket(b)
        g = graphs.graphs[bucket]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            g.replay()
        start.record()
        for _ in range(args.steps):
            g.replay()
        end.record()
        end.synchronize()
        replay_ms = start.elapsed_time(end) / args.steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                g.replay()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        events.sort(key=lambda e: -e.device_time_total)
        total = sum(e.device_time_total for e in events) / args.steps / 1e3
        print(f"\n== batch {b} (bucket {bucket}): one replay {replay_ms:.3f} ms; kernels sum {total:.3f} ms/step")
        print(f"{'ms/step':>8} {'calls/step':>10}  kernel")
        for e in events[:args.top]:
            print(f"{e.device_time_total / args.steps / 1e3:>8.3f} {e.count / args.steps:>10.1f}  {e.key[:110]}")
        while engine.has_unfinished():
            engine.step()
    return 0


def replay_ms(pipe, batch: int, steps: int) -> float:
    """A fresh engine (graphs captured now), `batch` one-image requests prefilled, one replay's median-ish time."""
    from llavakit.config import EngineConfig
    from llavakit.eval import bench
    from llavakit.sampling import SamplingParams

    engine = bench.BenchEngine(pipe, EngineConfig(max_num_seqs=16, kv_cache_memory=8 << 30))
    for i in range(batch):
        engine.submit(f"v{i}", {"prompt": bench.QUESTIONS[0], "images": [bench.noise(100 + i)]},
                           SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(12):
        engine.step()
    g = engine.runner.graphs.graphs[engine.runner.graphs.bucket(batch)]
    for _ in range(3):
        g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        g.replay()
    end.record()
    end.synchronize()
    engine.runner.release()
    return start.elapsed_time(end) / steps


def variants(pipe, args) -> None:
    """One replay's time with everything on, then with each optimisation off (the rest on)."""
    from llavakit.layers import triton_attention, triton_ops

    attn_layers = [layer.self_attn for layer in pipe.model.language_model.layers]
    mlps = [layer.mlp for layer in pipe.model.language_model.layers]

    def no_fused_ops(on):
        triton_ops.ENABLED = not on

    def no_splits(on):
        triton_attention.MAX_SPLITS = 1 if on else 16

    saved = {}

    def no_fused_projections(on):
        if on:
            saved["qkv"] = [a.qkv_weight for a in attn_layers]
            saved["gu"] = [m.gate_up_weight for m in mlps]
            for a in attn_layers:
                a.qkv_weight = None
            for m in mlps:
                m.gate_up_weight = None
            import llavakit.engine.model_runner as mr
            saved["fuse"], mr.fuse_projections = mr.fuse_projections, lambda model: 0
        else:
            import llavakit.engine.model_runner as mr
            mr.fuse_projections = saved["fuse"]
            for a, w in zip(attn_layers, saved["qkv"], strict=True):
                a.qkv_weight = w
            for m, w in zip(mlps, saved["gu"], strict=True):
                m.gate_up_weight = w

    rows = [("all on", None), ("no fused small ops", no_fused_ops), ("no context splits", no_splits),
            ("no fused projections", no_fused_projections)]
    batches = [int(x) for x in args.batch.split(",")]
    print(f"{'variant':<24}" + "".join(f"{'bs' + str(b) + ' ms':>10}" for b in batches))
    for name, switch in rows:
        if switch:
            switch(True)
        try:
            times = [replay_ms(pipe, b, args.steps) for b in batches]
        finally:
            if switch:
                switch(False)
        print(f"{name:<24}" + "".join(f"{t:>10.3f}" for t in times), flush=True)


if __name__ == "__main__":
    sys.exit(main())
