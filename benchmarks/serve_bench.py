"""HTTP serving load: `llavakit serve` against transformers' generate behind a minimal FastAPI endpoint,
same checkpoint, same requests (one image + a question, a fixed number of output tokens), same threads.
Every request has its own image (no concurrency level reuses another's), so the server's vision cache
never answers a timed request.

For each concurrency (default 1, 4, 16), `--requests-per-client` requests per client are sent by that many
concurrent clients to POST /v1/chat/completions; reported: requests/s and p50/p99 latency per server.
Each server runs in its own process, one at a time. The transformers endpoint answers one request at
a time (what a plain `model.generate` behind FastAPI does), with llavakit's preprocessing so that both
see the same input ids and pixels.

    python benchmarks/serve_bench.py                        # bench-small (random weights), CPU
    python benchmarks/serve_bench.py --model DIR --device cuda --dtype float16 --concurrency 1,8,32,64

Results: benchmarks/results/serve_<model>_<device>_<date>.{json,csv,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import datetime
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request  # module level: annotations resolve here

HERE = Path(__file__).resolve().parent
QUESTION = "Describe this image in detail."


# --- the transformers endpoint (run in its own process with --transformers-server) ---------------------------


def transformers_app(model_dir: str, dtype: str, device: str):
    """A minimal FastAPI app: one generate at a time, greedy, exactly max_tokens new tokens."""
    import torch
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    from llavakit.pipeline import load_processor, resolve_device, resolve_dtype

    dev = resolve_device(device)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=resolve_dtype(dtype, dev)).to(dev).eval()
    proc = load_processor(Path(model_dir))
    lock = threading.Lock()
    app = FastAPI()

    def generate(body: dict) -> dict:
        content = body["messages"][0]["content"]
        url = next(p["image_url"]["url"] for p in content if p["type"] == "image_url")
        text = next(p["text"] for p in content if p["type"] == "text")
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        prepared = proc.prepare_images([image])
        ids = proc.tokenize(proc.render_prompt(text, 1), prepared)
        n = body["max_tokens"]
        with lock, torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([ids], device=dev),
                                 pixel_values=prepared[0].pixel_values.to(dev, model.dtype),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False)
        new = out[0, len(ids):].tolist()
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": proc.tokenizer.decode(new)},
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new)}}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        return await asyncio.to_thread(generate, await request.json())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    return app


# --- load generation ------------------------------------------------------------------------------------------


def noise_png(seed: int, size: int) -> str:
    from PIL import Image

    rng = np.random.RandomState(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8")).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request_body(i: int, max_tokens: int, image_size: int) -> dict:
    return {"model": "bench", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": noise_png(i, image_size)}},
                {"type": "text", "text": QUESTION}]}]}


async def run_load(url: str, bodies: list[dict], concurrency: int) -> dict:
    """`concurrency` clients take requests from a shared queue until it is empty."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies, failures = [], 0

    async def client(http):
        nonlocal failures
        while not queue.empty():
            body = queue.get_nowait()
            start = time.perf_counter()
            r = await http.post("/v1/chat/completions", json=body)
            if r.status_code == 200 and r.json()["usage"]["completion_tokens"] == body["max_tokens"]:
                latencies.append(time.perf_counter() - start)
            else:
                failures += 1
                print(f"failed: HTTP {r.status_code} {r.text[:300]}", file=sys.stderr)

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=3600) as http:
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
    wall = time.perf_counter() - start
    if not latencies:
        raise RuntimeError(f"all {len(bodies)} requests to {url} failed")
    return {"concurrency": concurrency, "requests": len(bodies), "failures": failures, "seconds": wall,
            "requests_per_s": len(latencies) / wall, "p50_latency_s": statistics.median(latencies),
            "p99_latency_s": float(np.percentile(latencies, 99))}


# --- orchestration --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not come up in 10 minutes")


def bench_server(name: str, cmd: list[str], port: int, args) -> list[dict]:
    print(f"{name}: starting", file=sys.stderr, flush=True)
    proc = start(cmd, port)
    rows = []
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(run_load(url, [request_body(1_000_000 + i, 4, args.image_size) for i in range(2)], 2))  # warm-up
        first = 0
        for c in args.concurrency:
            n = c * args.requests_per_client  # every request its own image, none seen before by the server
            bodies = [request_body(first + i, args.output_tokens, args.image_size) for i in range(n)]
            first += n
            row = {"server": name, **asyncio.run(run_load(url, bodies, c))}
            print(f"{name}: concurrency {c}: {row['requests_per_s']:.2f} req/s, p50 {row['p50_latency_s']:.2f} s, "
                  f"p99 {row['p99_latency_s']:.2f} s", file=sys.stderr, flush=True)
            rows.append(row)
    finally:
        proc.terminate()
        proc.wait(60)
    return rows


def write_results(rows: list[dict], args, stem: str) -> None:
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    report = {"model": str(args.model), "device": args.device, "dtype": args.dtype,
              "date": datetime.date.today().isoformat(), "host": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "threads": args.threads, "output_tokens": args.output_tokens,
              "image_size": args.image_size, "requests_per_client": args.requests_per_client, "rows": rows}
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["server"] for r in rows):
        mine = [r for r in rows if r["server"] == name]
        ax1.plot([r["concurrency"] for r in mine], [r["requests_per_s"] for r in mine], "o-", label=name)
        ax2.plot([r["concurrency"] for r in mine], [r["p50_latency_s"] for r in mine], "o-", label=f"{name} p50")
        ax2.plot([r["concurrency"] for r in mine], [r["p99_latency_s"] for r in mine], "x--", label=f"{name} p99")
    ax1.set(xlabel="concurrent clients", ylabel="requests/s", xscale="log", title="throughput")
    ax2.set(xlabel="concurrent clients", ylabel="latency (s)", xscale="log", yscale="log", title="latency")
    for ax in (ax1, ax2):
        ax.set_xticks(args.concurrency, [str(c) for c in args.concurrency])
        ax.minorticks_off()
    ax1.legend()
    ax2.legend(fontsize=7)
    fig.suptitle(f"serving {Path(str(args.model)).name}, {args.device}, {args.output_tokens} output tokens, "
                 f"{report['date']}")
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: bench-small with random weights)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/llavakit-bench/engine"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of each server")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--transformers-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.transformers_server:
        import torch
        import uvicorn

        torch.set_num_threads(args.threads)
        uvicorn.run(transformers_app(args.model, args.dtype, args.device), host="127.0.0.1",
                    port=args.transformers_server, log_level="warning")
        return 0
    if args.model is None:
        sys.path.insert(0, str(HERE))
        from engine_bench import build_checkpoint

        args.model = str(build_checkpoint(args.workdir / "bench-small"))
    env_threads = ["env", f"OMP_NUM_THREADS={args.threads}"]
    port = free_port()
    rows = bench_server("llavakit", env_threads + [
        sys.executable, "-m", "llavakit", "serve", "--model", args.model, "--port", str(port), "--device",
        args.device, "--dtype", args.dtype, "--served-model-name", "bench", "--log-level", "warning",
        "--max-num-seqs", str(max(args.concurrency)), "--max-queue", str(max(args.concurrency) * 4)], port, args)
    if not args.skip_transformers:
        port = free_port()
        rows += bench_server("transformers", env_threads + [
            sys.executable, __file__, "--transformers-server", str(port), "--model", args.model, "--device",
            args.device, "--dtype", args.dtype, "--threads", str(args.threads)], port, args)
    device = f"cpu-{os.cpu_count()}c" if args.device == "cpu" else args.device
    write_results(rows, args, f"serve_{Path(args.model).name}_{device}_{datetime.date.today().isoformat()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
