"""Where a decode step's GPU time goes: torch.profiler over replays of the engine's captured decode graph.

    python benchmarks/profile_decode.py --tokenizer DIR [--preset llava-1.5-7b] [--batch 1] [--context 620]

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
    from llavakit.engine.llm_engine import LLMEngine
    from llavakit.eval import bench
    from llavakit.sampling import SamplingParams

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--preset", default="llava-1.5-7b")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    pipe = llavakit.load(args.preset, dtype="bfloat16", device="cuda", load_format="dummy", tokenizer=args.tokenizer)
    engine = LLMEngine(pipe, EngineConfig(max_num_seqs=16, kv_cache_memory=8 << 30))
    graphs = engine.runner.graphs
    for b in (int(x) for x in args.batch.split(",")):
        reqs = [{"prompt": bench.QUESTIONS[0], "images": [bench.noise(100 + i)]} for i in range(b)]
        for i, r in enumerate(reqs):
            engine.add_request(f"p{b}-{i}", r, SamplingParams(max_tokens=40, ignore_eos=True))
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


if __name__ == "__main__":
    sys.exit(main())
