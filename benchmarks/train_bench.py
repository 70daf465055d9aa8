"""Training throughput: llavakit's trainer against transformers' Llava model in a plain PyTorch loop.

Both sides train the same fp32 random-weight llava-hf checkpoint on the same synthetic LLaVA data (noise
images, conversations with answers of mixed lengths), the same batches in the same order, on the CPU
with the same thread count, each in a fresh process:

- llavakit: `llavakit.train.recipe.train(make_config(stage="finetune", ...))`; step times come from the
  returned history (tokens_per_s), so the final checkpoint save inside train() is not timed.
- transformers: `LlavaForConditionalGeneration.from_pretrained(dtype=float32)`, fed the batches that
  llavakit's own dataset and collate build; forward(labels=...) -> backward -> clip_grad_norm_(1.0) ->
  AdamW, training what llavakit's finetune stage trains (projector, language model, LM head).

Tokens/s counts the input tokens that are not padding (image placeholders included) per second of step
time (forward, backward, clipping, optimizer), after --warmup steps. Peak RSS is VmHWM, reset just
before the model is built (see load_bench's `_reset_peak`), read after the last step. Both sides compute
the loss as the mean over the batch's supervised tokens, so their losses must agree step by step.

    python benchmarks/train_bench.py --steps 4 --batch-size 2 --warmup 1   # smoke run
    python benchmarks/train_bench.py --threads 1                           # preset "mini", ~40 s per round
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from load_bench import _proc_status, _reset_peak
from random_checkpoint import CheckpointSpec, ensure_checkpoint, weight_files
from synthetic_data import make_dataset

TOOLS = ("llavakit", "transformers")
RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2**20
SEED = 42
LEARNING_RATE = 1e-4

# Small enough to train on a laptop CPU: 112 px / 14 = 8x8 = 64 image tokens, ~50 M parameters in fp32.
PRESETS: dict[str, CheckpointSpec] = {
    "mini": CheckpointSpec(vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                       num_attention_heads=4, image_size=112, patch_size=14, projection_dim=256),
                           text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=8),
                           dtype="float32"),
}


def log(msg: str) -> None:
    """Progress goes to stderr, the results table to stdout."""
    print(f"[train_bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- worker: one training run, in its own process

def reference_batches(job: dict) -> list[dict]:
    """The collated batch of every step, built by llavakit's dataset and collate in the order
    llavakit's recipe draws them (one process, no accumulation, no modality grouping)."""
    from llavakit.pipeline import load_processor
    from llavakit.train.data import LlavaDataset, ModalityGroupedBatches, load_records

    processor = load_processor(Path(job["checkpoint"]))
    dataset = LlavaDataset(load_records(job["data"]), processor, processor.template, Path(job["images"]), 2048)
    order = ModalityGroupedBatches(len(dataset), [dataset.modality(i) for i in range(len(dataset))],
                                   job["batch_size"], SEED, group_by_modality=False)
    per_epoch = len(order.batches(0))
    out = []
    for step in range(job["steps"]):
        epoch, k = divmod(step, per_epoch)
        batch = dataset.collate([dataset[i] for i in order.batches(epoch)[k]])
        assert not batch["skipped"], f"synthetic rows were skipped: {batch['skipped']}"
        batch["input_tokens"] = int((batch["input_ids"] != dataset.pad_id).sum())
        batch["pad_id"] = dataset.pad_id
        out.append(batch)
    return out


def _profile_table(prof, rows: int = 15) -> dict:
    """Top ops by self CPU time of one profiled step, and the step's total."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    top = [dict(op=e.key, self_ms=e.self_cpu_time_total / 1e3, calls=e.count) for e in events[:rows]]
    return dict(total_self_ms=total, top=top)


def train_llavakit(job: dict) -> dict:
    """llavakit's recipe, as `llavakit train` runs it; the peak is read after the last step, before the
    final save, and the last step runs under the profiler when asked."""
    import torch

    from llavakit.train.config import make_config
    from llavakit.train.recipe import train

    cfg = make_config(stage="finetune", model=job["checkpoint"], data_path=job["data"], image_folder=job["images"],
                      output_dir=job["output"], per_device_train_batch_size=job["batch_size"],
                      max_steps=job["steps"], learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
                      warmup_ratio=0.0, save_steps=job["steps"] + 1, logging_steps=1, seed=SEED, device="cpu",
                      micro_batches_by_length=job.get("micro_batches_by_length", 1))
    marks: dict = {}
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if job["profile"] else None

    def on_step(info) -> None:
        if prof is not None and info.step == job["steps"] - 1:
            prof.start()
        if info.step == job["steps"]:
            if prof is not None:
                prof.stop()
            marks["after_steps"] = _proc_status()

    history = train(cfg, [on_step])
    marks["after_save"] = _proc_status()
    batches = reference_batches(job)
    steps = [dict(step=h.step, loss=h.loss, grad_norm=h.grad_norm, tokens=h.tokens, input_tokens=b["input_tokens"],
                  step_s=b["input_tokens"] / h.tokens_per_s, same_tokens=h.tokens == b["num_tokens"])
             for h, b in zip(history, batches, strict=True)]
    return dict(steps=steps, profile=_profile_table(prof) if prof else None, **marks)


def _transformers_inputs(batch: dict) -> dict:
    """llavakit's collated batch in transformers' form: stacked pixels (N, 3, S, S), a padding mask."""
    import torch

    return dict(input_ids=batch["input_ids"], labels=batch["labels"], pixel_values=torch.cat(batch["pixel_values"]),
                attention_mask=(batch["input_ids"] != batch["pad_id"]).long(), use_cache=False)


def _transformers_step(model, params: list, optimizer, inputs: dict) -> tuple[float, float, float]:
    """One plain training step; returns (loss, gradient norm before clipping, seconds)."""
    import time

    import torch

    start = time.perf_counter()
    loss = model(**inputs).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss), float(norm), time.perf_counter() - start


def train_transformers(job: dict) -> dict:
    """A plain loop over LlavaForConditionalGeneration: the vision tower frozen, AdamW as llavakit's
    (betas 0.9/0.999, eps 1e-8, no weight decay, constant lr), gradients clipped to norm 1; the last
    step runs under the profiler when asked."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration.from_pretrained(job["checkpoint"], dtype=torch.float32)
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith("model.vision_tower."))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    batches = reference_batches(job)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if job["profile"] else None
    steps = []
    for i, batch in enumerate(batches, start=1):
        inputs = _transformers_inputs(batch)
        if prof is not None and i == len(batches):
            prof.start()
        loss, norm, step_s = _transformers_step(model, params, optimizer, inputs)
        steps.append(dict(step=i, loss=loss, grad_norm=norm, tokens=batch["num_tokens"],
                          input_tokens=batch["input_tokens"], step_s=step_s, same_tokens=True))
    if prof is not None:
        prof.stop()
    after = _proc_status()
    return dict(steps=steps, profile=_profile_table(prof) if prof else None, after_steps=after, after_save=after)


def worker(tool: str, job: dict) -> None:
    """Both libraries imported first (each side uses the other's modules too), then the peak is reset
    and the run starts; one JSON line of measurements goes to stdout."""
    import gc

    import torch
    import transformers.models.llava.modeling_llava  # noqa: F401

    import llavakit.train.recipe  # noqa: F401

    torch.set_num_threads(job["threads"])
    gc.collect()
    peak_reset = _reset_peak()
    before = _proc_status()
    result = (train_llavakit if tool == "llavakit" else train_transformers)(job)
    print(json.dumps(dict(before=before, peak_reset=peak_reset, threads=torch.get_num_threads(), **result)))


# ---------------------------------------------------------------- parent: build, run, summarize, write

def run_once(tool: str, job: dict) -> dict:
    """One training run of `tool` in a fresh interpreter, pinned to job["threads"] threads."""
    threads = str(job["threads"])
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    shutil.rmtree(job["output"], ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--worker", tool, json.dumps(job)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} training failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def derive(m: dict, warmup: int, profiled: bool) -> dict:
    """The reported metrics of one run: steps after `warmup` (and before a profiled last step) timed."""
    timed = m["steps"][warmup:len(m["steps"]) - int(profiled)]
    rss0, peak = m["before"]["VmRSS"], m["after_steps"]["VmHWM"]
    return dict(tokens_per_s=sum(s["input_tokens"] for s in timed) / sum(s["step_s"] for s in timed),
                step_ms=statistics.median(s["step_s"] for s in timed) * 1e3,
                tokens_per_step=statistics.mean(s["input_tokens"] for s in timed),
                peak_rss_mib=peak / 1024, peak_rss_delta_mib=(peak - rss0) / 1024, rss_before_mib=rss0 / 1024,
                anon_after_steps_mib=m["after_steps"]["RssAnon"] / 1024,
                peak_rss_with_save_mib=m["after_save"]["VmHWM"] / 1024,
                first_loss=m["steps"][0]["loss"], last_loss=m["steps"][-1]["loss"],
                first_grad_norm=m["steps"][0]["grad_norm"], timed_steps=len(timed),
                same_tokens=all(s["same_tokens"] for s in m["steps"]), peak_reset=m["peak_reset"],
                threads=m["threads"])


METRICS = (
    ("tokens_per_s", "tokens/s (input, non-pad)"),
    ("step_ms", "step time, median (ms)"),
    ("peak_rss_mib", "peak RSS in training (MiB)"),
    ("peak_rss_delta_mib", "peak RSS - RSS after imports (MiB)"),
    ("anon_after_steps_mib", "RssAnon after last step (MiB)"),
    ("rss_before_mib", "RSS after imports (MiB)"),
)


def run_all(job: dict, repeats: int) -> tuple[list[dict], list[dict]]:
    """`repeats` rounds, the first tool of a round alternating; returns (per-run metrics, per-step rows)."""
    runs, rows = [], []
    for i in range(repeats):
        for tool in TOOLS if i % 2 == 0 else TOOLS[::-1]:
            log(f"round {i + 1}/{repeats}: {job['steps']} steps with {tool}")
            load = os.getloadavg()[0]  # another job on the machine shows here
            m = run_once(tool, job)
            r = dict(derive(m, job["warmup"], job["profile"]), load_average_1min=load)
            log(f"  {tool}: {r['tokens_per_s']:.0f} tokens/s, {r['step_ms']:.0f} ms/step, "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB, first loss {r['first_loss']:.5f}")
            runs.append(dict(tool=tool, round=i + 1, **r, profile=m["profile"]))
            rows += [dict(tool=tool, round=i + 1, timed=job["warmup"] < s["step"], **s) for s in m["steps"]]
    return runs, rows


def medians(runs: list[dict]) -> dict[str, dict[str, float]]:
    keys = [k for k, _ in METRICS] + ["peak_rss_with_save_mib", "first_loss", "last_loss", "first_grad_norm",
                                      "tokens_per_step"]
    return {t: {k: statistics.median(r[k] for r in runs if r["tool"] == t) for k in keys} for t in TOOLS}


def parity_lines(med: dict, runs: list[dict]) -> list[str]:
    """First/last-step loss and the first step's gradient norm of each side, and whether the data agreed."""
    lk, tf = med["llavakit"], med["transformers"]
    lines = [f"{label:<36}{lk[k]:>12.5f}{tf[k]:>14.5f}   diff {lk[k] - tf[k]:+.1e}"
             for k, label in (("first_loss", "loss, step 1"), ("first_grad_norm", "grad norm, step 1"),
                              ("last_loss", "loss, last step"))]
    if not all(r["same_tokens"] for r in runs):
        lines.append("WARNING: llavakit's supervised-token counts differ from the reference batches")
    return lines


def format_table(med: dict, runs: list[dict], job: dict, spec_note: str) -> str:
    title = f"metric (median of {job['repeats']})"
    head = f"{title:<36}{'llavakit':>12}{'transformers':>14}{'ratio lk/tf':>13}"
    profiled = ", last step profiled, not timed" if job["profile"] else ""
    split = job.get("micro_batches_by_length", 1)
    split_note = f" (llavakit: as {split} micro-batches by length)" if split > 1 else ""
    setup = (f"batch {job['batch_size']}{split_note}, {job['steps']} steps "
             f"({job['warmup']} warm-up not timed{profiled}), "
             f"~{med['llavakit']['tokens_per_step']:.0f} input tokens/step, {_threads(job['threads'])}")
    lines = [spec_note, setup, head, "-" * len(head)]
    for key, label in METRICS:
        a, b = med["llavakit"][key], med["transformers"][key]
        lines.append(f"{label:<36}{a:>12.1f}{b:>14.1f}{(f'{a / b:.2f}' if b else 'n/a'):>13}")
    lines += parity_lines(med, runs)
    lines.append(f"llavakit peak RSS including its final save: {med['llavakit']['peak_rss_with_save_mib']:.0f} MiB")
    if not all(r["peak_reset"] for r in runs):
        lines.append("NOTE: /proc/self/clear_refs was not writable; peaks include the import-time peak")
    return "\n".join(lines)


def _threads(n: int) -> str:
    return f"{n} thread" + "s" * (n != 1)


def format_profiles(runs: list[dict]) -> str:
    """The profiled last step of each side's first run: top ops by self CPU time."""
    out = []
    for tool in TOOLS:
        prof = next(r["profile"] for r in runs if r["tool"] == tool)
        out.append(f"\n{tool}: profiled step, {prof['total_self_ms']:.0f} ms self CPU in all ops; top ops:")
        out += [f"  {e['self_ms']:>9.1f} ms {e['calls']:>6}x  {e['op']}" for e in prof["top"]]
    return "\n".join(out)


def environment(args: argparse.Namespace, directory: Path) -> dict:
    import torch
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown")
    return dict(date=datetime.date.today().isoformat(), time=datetime.datetime.now().isoformat(timespec="seconds"),
                python=sys.version.split()[0], torch=torch.__version__, transformers=transformers.__version__,
                cpu=cpu, cores=os.cpu_count(), threads=args.threads, load_average=os.getloadavg(),
                preset=args.preset, checkpoint=str(directory),
                checkpoint_bytes=sum(f.stat().st_size for f in weight_files(directory)), samples=args.samples,
                micro_batches_by_length=args.micro_batches_by_length,
                batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, learning_rate=LEARNING_RATE)


def write_results(stem: Path, env: dict, runs: list[dict], rows: list[dict], med: dict, table: str) -> None:
    lk, tf = med["llavakit"], med["transformers"]
    ratios = {k: lk[k] / tf[k] if tf[k] else None for k, _ in METRICS}
    report = dict(environment=env, median=med, ratio_llavakit_over_transformers=ratios, runs=runs, table=table)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_chart(stem.with_suffix(".png"), env, med, rows)


def write_chart(path: Path, env: dict, med: dict, rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no chart (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, unit in ((axes[0], "tokens_per_s", "tokens/s"), (axes[1], "peak_rss_mib", "peak RSS (MiB)")):
        ax.bar(TOOLS, [med[t][key] for t in TOOLS], color=["tab:blue", "tab:orange"])
        ax.set_ylabel(unit)
    for tool in TOOLS:
        mine = [r for r in rows if r["tool"] == tool and r["round"] == 1]
        axes[2].plot([r["step"] for r in mine], [r["step_s"] * 1e3 for r in mine], marker="o", label=tool)
    axes[2].set_xlabel("step (round 1)")
    axes[2].set_ylabel("step time (ms)")
    axes[2].legend()
    fig.suptitle(f"LLaVA training step, preset {env['preset']} fp32, batch {env['batch_size']}, "
                 f"{env['cpu']}, {_threads(env['threads'])}, median (last step: profiled if --profile)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="mini")
    p.add_argument("--samples", type=int, default=64, help="synthetic training rows")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timings")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch/OpenMP threads of both sides")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--micro-batches-by-length", type=int, default=1,
                   help="llavakit runs each batch as this many micro-batches of similar length (same gradient)")
    p.add_argument("--profile", action="store_true", help="profile the last step of each side (not timed)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/llavakit-bench"))
    p.add_argument("--worker", nargs=2, metavar=("TOOL", "JOB"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.worker and args.steps - args.warmup - int(args.profile) < 1:
        p.error("--steps must leave at least one timed step after --warmup (and the profiled last step)")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args.worker[0], json.loads(args.worker[1]))
        return
    spec = PRESETS[args.preset]
    directory = ensure_checkpoint(args.workdir / args.preset, spec, log)
    data = make_dataset(args.workdir / f"train-data-{args.samples}", args.samples, SEED)
    job = dict(checkpoint=str(directory), data=str(data), images=str(data.parent / "images"),
               output=str(args.workdir / "train-output"), batch_size=args.batch_size, steps=args.steps,
               warmup=args.warmup, threads=args.threads, profile=args.profile, repeats=args.repeats,
               micro_batches_by_length=args.micro_batches_by_length)
    runs, rows = run_all(job, args.repeats)
    env = environment(args, directory)
    med = medians(runs)
    note = (f"checkpoint: preset {args.preset}, {env['checkpoint_bytes'] / MiB:.0f} MiB of fp32 safetensors "
            f"(~{env['checkpoint_bytes'] / 4e6:.0f} M parameters); {args.samples} synthetic rows")
    table = format_table(med, runs, job, note)
    print(table + (format_profiles(runs) if args.profile else ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    split = f"_split{args.micro_batches_by_length}" if args.micro_batches_by_length > 1 else ""
    stem = RESULTS / f"train_{args.preset}{split}_cpu-{os.cpu_count()}c_{env['date']}"
    write_results(stem, env, runs, rows, med, table)
    log(f"wrote {stem}.{{json,csv,png}}")


if __name__ == "__main__":
    main()
