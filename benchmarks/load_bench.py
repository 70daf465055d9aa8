"""Checkpoint loading: llavakit's `load_llava` against transformers' `from_pretrained`, same checkpoint.

Builds (once, cached) a random-weight llava-hf checkpoint, reads its files once so that both loaders see
a warm page cache, then loads it --repeats times with each loader, alternating which goes first, each
load in a fresh process so that its peak RSS is its own. Reports medians and llavakit/transformers
ratios; writes JSON, CSV and a PNG chart to benchmarks/results/.

Reading the numbers: an fp16 checkpoint loaded in fp16 on the CPU stays memory-mapped in both libraries,
so "load time" maps the files without reading them; "load + page in every weight" adds touching every
4 KiB page, the time to a model whose weights are all resident. Peak RSS is VmHWM reset just before the
load (see `_reset_peak`); file-backed pages (RssFile) are shared with the page cache, anonymous ones
(RssAnon) are the process's own.

    python benchmarks/load_bench.py --preset tiny --repeats 1     # smoke run, seconds
    python benchmarks/load_bench.py                               # preset "small" (~3 GB), minutes
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from random_checkpoint import PRESETS, ensure_checkpoint, weight_files

TOOLS = ("llavakit", "transformers")
RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2**20


def log(msg: str) -> None:
    """Progress goes to stderr, the results table to stdout."""
    print(f"[load_bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- worker: one load, in its own process

def _proc_status() -> dict[str, int]:
    """Current VmRSS / VmHWM (peak) / RssAnon / RssFile of this process, in KiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def _reset_peak() -> bool:
    """Set VmHWM back to the current RSS so that the next peak is the load's alone.
    ru_maxrss cannot be used: Linux carries the parent's peak RSS over fork+exec into the child's
    ru_maxrss, so after building a checkpoint every worker would report the builder's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _touch_pages(model) -> int:
    """Read one element per 4 KiB page of every parameter: a lazily mapped weight is paged in here.
    Returns the bytes the model's parameters hold."""
    import torch

    nbytes, seen, acc = 0, set(), torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        acc += p.detach().reshape(-1)[:: 4096 // p.element_size()].sum(dtype=torch.float64)
        nbytes += p.numel() * p.element_size()
    assert torch.isfinite(acc)
    return nbytes


def _embed_checksum(model) -> float:
    """Sum of the token embedding, a tensor both loaders keep as stored: equal sums mean equal data."""
    import torch

    embed = next(p for n, p in model.named_parameters() if n.endswith("embed_tokens.weight"))
    return sum(float(c.sum(dtype=torch.float64)) for c in embed.detach().reshape(-1).split(1 << 20))


def _loader(tool: str, directory: Path):
    """A no-argument function that loads `directory` with `tool` in fp16 on the CPU (imports done here)."""
    import torch

    if tool == "llavakit":
        from llavakit.checkpoint_config import read_checkpoint_config
        from llavakit.weights.loader import load_llava

        return lambda: load_llava(read_checkpoint_config(directory), directory, torch.float16,
                                  torch.device("cpu"))
    from transformers import LlavaForConditionalGeneration

    return lambda: LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float16)


def worker(tool: str, directory: Path) -> None:
    """Load once, then page every weight in; print one JSON line of measurements on stdout."""
    import gc

    load = _loader(tool, directory)
    gc.collect()
    peak_reset = _reset_peak()
    before = _proc_status()
    t0 = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - t0
    loaded_at = time.monotonic()  # system-wide clock on Linux: the parent compares it with its spawn time
    after_load = _proc_status()
    t1 = time.perf_counter()
    nbytes = _touch_pages(model)
    touch_s = time.perf_counter() - t1
    after_touch = _proc_status()
    print(json.dumps(dict(load_s=load_s, touch_s=touch_s, loaded_at=loaded_at, peak_reset=peak_reset,
                          before=before, after_load=after_load, after_touch=after_touch,
                          embed_checksum=_embed_checksum(model), param_bytes=nbytes)))


# ---------------------------------------------------------------- parent: build, run, summarize, write

def warm_cache(directory: Path) -> float:
    """Read every weight file once (like `cat > /dev/null`) so that every load finds them in the page cache."""
    t0 = time.perf_counter()
    for f in weight_files(directory):
        with open(f, "rb") as fh:
            while fh.read(16 * MiB):
                pass
    return time.perf_counter() - t0


def run_once(tool: str, directory: Path) -> dict:
    """One load of `tool` in a fresh interpreter, with the process time up to a loaded model."""
    spawned = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, "--worker", tool, str(directory)],
                          capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} load failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    m["process_s"] = m.pop("loaded_at") - spawned
    return m


def derive(m: dict, weight_bytes: int) -> dict:
    """The reported metrics of one run (memory in MiB, relative to the RSS just before the load)."""
    before = m["before"]
    rss0 = before["VmRSS"]
    peak_load, peak_touch = m["after_load"]["VmHWM"], m["after_touch"]["VmHWM"]
    return dict(load_s=m["load_s"], process_s=m["process_s"], load_touch_s=m["load_s"] + m["touch_s"],
                peak_rss_delta_mib=(peak_load - rss0) / 1024,
                peak_rss_delta_per_ckpt=(peak_load - rss0) * 1024 / weight_bytes,
                anon_after_load_mib=(m["after_load"]["RssAnon"] - before["RssAnon"]) / 1024,
                file_after_load_mib=(m["after_load"]["RssFile"] - before["RssFile"]) / 1024,
                peak_rss_delta_touched_mib=(peak_touch - rss0) / 1024,
                rss_before_mib=rss0 / 1024, peak_rss_mib=peak_load / 1024,
                param_mib=m["param_bytes"] / MiB, embed_checksum=m["embed_checksum"], peak_reset=m["peak_reset"])


METRICS = (
    ("load_s", "load time (s)"),
    ("process_s", "process total to loaded (s)"),
    ("load_touch_s", "load + page in every weight (s)"),
    ("peak_rss_delta_mib", "peak RSS delta (MiB)"),
    ("peak_rss_delta_per_ckpt", "peak RSS delta / checkpoint bytes"),
    ("anon_after_load_mib", "RssAnon delta after load (MiB)"),
    ("file_after_load_mib", "RssFile delta after load (MiB)"),
    ("peak_rss_delta_touched_mib", "peak RSS delta incl. page-in (MiB)"),
    ("rss_before_mib", "RSS before load, imports (MiB)"),
    ("peak_rss_mib", "peak RSS in load, absolute (MiB)"),
    ("param_mib", "parameters held (MiB)"),
)


def run_all(directory: Path, repeats: int, weight_bytes: int) -> list[dict]:
    """`repeats` rounds; the first tool of a round alternates."""
    runs = []
    for i in range(repeats):
        for tool in TOOLS if i % 2 == 0 else TOOLS[::-1]:
            log(f"round {i + 1}/{repeats}: loading with {tool}")
            r = derive(run_once(tool, directory), weight_bytes)
            log(f"  {tool}: {r['load_s']:.2f} s, peak RSS +{r['peak_rss_delta_mib']:.0f} MiB")
            runs.append(dict(tool=tool, round=i + 1, **r))
    return runs


def medians(runs: list[dict]) -> dict[str, dict[str, float]]:
    return {t: {k: statistics.median(r[k] for r in runs if r["tool"] == t) for k, _ in METRICS} for t in TOOLS}


def check_same_weights(runs: list[dict]) -> bool:
    """Both loaders must have read the same embedding (the one tensor both keep unchanged)."""
    sums = {round(r["embed_checksum"], 3) for r in runs}
    return len(sums) == 1


def environment(preset: str, directory: Path, weight_bytes: int, n_tensors: int) -> dict:
    import torch
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown")
    return dict(date=datetime.date.today().isoformat(), time=datetime.datetime.now().isoformat(timespec="seconds"),
                python=sys.version.split()[0], torch=torch.__version__, transformers=transformers.__version__,
                cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), preset=preset,
                checkpoint=str(directory), checkpoint_bytes=weight_bytes, checkpoint_tensors=n_tensors,
                page_cache="warm: every weight file read once before the first load")


def format_table(med: dict, weight_bytes: int, repeats: int) -> str:
    head = f"{'metric (median of ' + str(repeats) + ')':<36}{'llavakit':>12}{'transformers':>14}{'ratio lk/tf':>13}"
    size = f"{weight_bytes / 2**30:.2f} GiB of fp16 safetensors (~{weight_bytes / 2e9:.2f} B parameters)"
    lines = [f"checkpoint: {size}; page cache warm for every load", head, "-" * len(head)]
    for key, label in METRICS:
        a, b = med["llavakit"][key], med["transformers"][key]
        ratio = f"{a / b:.2f}" if b else "n/a"
        lines.append(f"{label:<36}{a:>12.3f}{b:>14.3f}{ratio:>13}")
    return "\n".join(lines)


def write_results(stem: Path, env: dict, runs: list[dict], med: dict, table: str) -> None:
    lk, tf = med["llavakit"], med["transformers"]
    ratios = {k: lk[k] / tf[k] if tf[k] else None for k, _ in METRICS}
    report = dict(environment=env, median=med, ratio_llavakit_over_transformers=ratios, runs=runs, table=table)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(runs[0]))
        w.writeheader()
        w.writerows(runs)
    write_chart(stem.with_suffix(".png"), env, med)


def write_chart(path: Path, env: dict, med: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no chart (pip install matplotlib)")
        return
    panels = (("load_s", "load_touch_s", "process_s"),
              ("peak_rss_delta_mib", "anon_after_load_mib", "file_after_load_mib"))
    labels = dict(METRICS)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, keys in zip(axes, panels, strict=True):
        x = range(len(keys))
        for j, tool in enumerate(TOOLS):
            ax.bar([i + (j - 0.5) * 0.38 for i in x], [med[tool][k] for k in keys], width=0.38, label=tool)
        ax.set_xticks(list(x), [labels[k] for k in keys], rotation=12, fontsize=8)
        ax.legend()
    axes[0].set_ylabel("seconds")
    axes[1].set_ylabel("MiB")
    fig.suptitle(f"LLaVA checkpoint load, preset {env['preset']} ({env['checkpoint_bytes'] / 2**30:.2f} GiB fp16), "
                 f"{env['cpu']} x{env['cores']}, warm page cache, median")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/llavakit-bench"))
    p.add_argument("--worker", nargs=2, metavar=("TOOL", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]))
        return
    directory = ensure_checkpoint(args.workdir / args.preset, PRESETS[args.preset], log)
    files = weight_files(directory)
    weight_bytes = sum(f.stat().st_size for f in files)
    log(f"warming the page cache: read {weight_bytes / MiB:.0f} MiB in {warm_cache(directory):.1f} s")
    runs = run_all(directory, args.repeats, weight_bytes)
    n_tensors = len(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"])
    env = environment(args.preset, directory, weight_bytes, n_tensors)
    med = medians(runs)
    table = format_table(med, weight_bytes, args.repeats)
    if not check_same_weights(runs):
        table += "\nWARNING: the two loaders read different embedding values"
    if not all(r["peak_reset"] for r in runs):
        table += "\nNOTE: /proc/self/clear_refs was not writable; peaks include the import-time peak"
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"load_{args.preset}_cpu-{os.cpu_count()}c_{env['date']}"
    write_results(stem, env, runs, med, table)
    log(f"wrote {stem}.{{json,csv,png}}")


if __name__ == "__main__":
    main()
