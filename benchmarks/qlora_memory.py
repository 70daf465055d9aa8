"""Peak memory of LoRA training on the llava-1.5-7b preset (random weights): LoRA on the float32 base llavakit trains
(`--bf16` changes only the compute dtype, not what is stored) against QLoRA (the base quantized to w4a16 or w8a16 as
it loads), on the CPU.

Each measurement is one `llavakit train --stage lora` process under `/usr/bin/time -v` (its "Maximum resident set
size": loading, the steps and the final adapter save): LLaVA-1.5's LoRA settings (r 128, alpha 256, on every
Linear of the decoder; projector trained), batch 1, a few text-only rows of ~40 tokens (`--model-max-length 64`).
The steps compute in float32: on a CPU without AVX512-BF16 a bfloat16 matmul runs ~150x slower than a float32 one
(46 s against 0.29 s for 512x2048 @ 2048x2048, one thread, on the machine measured). With `--bf16`, LoRA on the
float base also keeps autocast's bfloat16 copy of each frozen weight until the backward (not measured here).
The checkpoint is written first by `write`, in its own process (a forked child would carry over its parent's
peak RSS), at the preset's size or with fewer decoder layers (`--layers`): a float32 base of all 32 layers needs
~27 GiB, more than a 24 GiB machine has, so its cost per layer is measured on smaller models.

    python benchmarks/qlora_memory.py write --layers 32 --out /tmp/llava7b         # ~13 GiB on disk (bf16)
    python benchmarks/qlora_memory.py measure --model /tmp/llava7b --mode w4a16     # appends to --results
    python benchmarks/qlora_memory.py table                                         # the docs' markdown table
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / f"qlora_memory_cpu-2c_{datetime.date.today()}.json"
MODES = ("float", "w8a16", "w4a16")  # float: LoRA on the float32 base
ROWS = [("What is two plus two?", "It is four."), ("Name a color.", "Blue is a color."),
        ("Say hello.", "Hello there!"), ("What is the sky like?", "The sky is clear today.")]
GIB = 2**30


def write(layers: int, out: Path, seed: int) -> None:
    """A random llava-1.5-7b llava-hf checkpoint in bfloat16, with `layers` decoder layers (the preset has 32)."""
    import torch
    from transformers import AutoTokenizer

    from llavakit.presets import preset_config, preset_tokenizer_dir
    from llavakit.weights.loader import random_llava
    from llavakit.weights.save import save_llava_hf

    cfg = preset_config("llava-1.5-7b")
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_hidden_layers=layers))
    tokenizer = AutoTokenizer.from_pretrained(preset_tokenizer_dir("llava-1.5-7b"))
    tokenizer.add_tokens(["<image>", "<pad>"], special_tokens=True)
    tokenizer.pad_token = "<pad>"
    model = random_llava(cfg, torch.bfloat16, torch.device("cpu"), seed=seed)
    save_llava_hf(model, out, tokenizer, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))


def measure(model: Path, mode: str, steps: int, threads: int) -> dict:
    """One training run's peak RSS (GiB) and wall time; raises when the run fails."""
    layers = json.loads((model / "config.json").read_text())["text_config"]["num_hidden_layers"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.json"
        data.write_text(json.dumps([{"id": f"r{i}", "conversations": [{"from": "human", "value": q},
                                                                      {"from": "gpt", "value": a}]}
                                    for i, (q, a) in enumerate(ROWS)]))
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "llavakit", "train", "--stage", "lora", "--model",
               str(model), "--data-path", str(data), "--output-dir", f"{tmp}/out", "--max-steps", str(steps),
               "--per-device-train-batch-size", "1", "--model-max-length", "64",
               "--learning-rate", "1e-4", "--save-strategy", "no", "--report-to", "none", "--threads", str(threads)]
        if mode != "float":
            cmd += ["--quantization", mode]
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"training failed ({mode}, {layers} layers):\n{result.stderr[-3000:]}")
        losses = [json.loads(line)["loss"] for line in (Path(tmp) / "out" / "train_log.jsonl").open()]
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return {"mode": mode, "decoder_layers": layers, "steps": steps, "threads": threads,
            "peak_rss_gib": round(peak_kib * 1024 / GIB, 2), "wall_s": round(wall, 1),
            "losses": [round(x, 4) for x in losses]}


def table(results: dict) -> str:
    """Markdown: peak RSS per mode and decoder layer count, a mode without a 32-layer run extrapolated."""
    runs = results["runs"]
    layers = sorted({r["decoder_layers"] for r in runs})
    names = ["LoRA, float32 base" if m == "float" else f"QLoRA {m}" for m in MODES]
    lines = ["| decoder layers | " + " | ".join(names) + " |", "|---|" + "---|" * len(MODES)]
    for n in layers:
        cells = []
        for mode in MODES:
            found = [r["peak_rss_gib"] for r in runs if r["mode"] == mode and r["decoder_layers"] == n]
            cells.append(f"{found[0]:.1f} GiB" if found else "")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    for mode, fit in results.get("extrapolated", {}).items():
        lines.append(f"\n{mode} at 32 layers (extrapolated: {fit['base_gib']:.2f} + 32 x {fit['per_layer_gib']:.3f}"
                     f" GiB): {fit['at_32_gib']:.1f} GiB")
    return "\n".join(lines)


def extrapolate(runs: list[dict]) -> dict:
    """Per mode with two or more layer counts but no 32-layer run: a straight line through the smallest and largest
    layer counts measured, read at 32 layers."""
    out = {}
    for mode in MODES:
        points = sorted((r["decoder_layers"], r["peak_rss_gib"]) for r in runs if r["mode"] == mode)
        if len(points) < 2 or any(n == 32 for n, _ in points):
            continue
        (n0, m0), (n1, m1) = points[0], points[-1]
        per_layer = (m1 - m0) / (n1 - n0)
        base = m0 - n0 * per_layer
        out[mode] = {"per_layer_gib": round(per_layer, 3), "base_gib": round(base, 2),
                     "at_32_gib": round(base + 32 * per_layer, 1), "from_layers": [n0, n1]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write a random llava-1.5-7b checkpoint (bfloat16)")
    w.add_argument("--layers", type=int, default=32)
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("measure", help="one LoRA training run's peak RSS, appended to --results")
    m.add_argument("--model", type=Path, required=True)
    m.add_argument("--mode", choices=MODES, required=True)
    m.add_argument("--steps", type=int, default=3)
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--results", type=Path, default=RESULTS)
    t = sub.add_parser("table", help="print the markdown table of --results")
    t.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.command == "write":
        write(args.layers, args.out, args.seed)
        return
    results = json.loads(args.results.read_text()) if args.results.is_file() else {
        "date": str(datetime.date.today()), "machine": "2-core AMD EPYC VM, 24 GiB, shared", "preset": "llava-1.5-7b",
        "note": "peak RSS (/usr/bin/time -v) of `llavakit train --stage lora` (LLaVA-1.5 LoRA: r 128, alpha 256), "
                "batch 1, text-only rows of ~40 tokens, float32 compute, random weights; the LoRA base is "
                "float32 (as with --bf16)", "runs": []}
    if args.command == "measure":
        run = measure(args.model, args.mode, args.steps, args.threads)
        print(json.dumps(run))
        results["runs"] = [r for r in results["runs"] if (r["mode"], r["decoder_layers"]) !=
                           (run["mode"], run["decoder_layers"])] + [run]
        results["extrapolated"] = extrapolate(results["runs"])
        args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
