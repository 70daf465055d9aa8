"""How closely a weight-only quantized model follows its float original, at real size, with dummy weights.

Each method's model is the float one quantized: every model is drawn from the same seed (random_llava draws each
quantized weight in float and quantizes it at once). The language model reads a fixed English text (--tokens
tokens through the preset's tokenizer; text only: the vision tower stays float under quantization), then the float
model continues it greedily for --continuation tokens, and each quantized model is fed that same continuation one
token at a time (prefill then decode steps, the paths a served model runs). Per method against float, over every
next-token position: the cosine similarity of the logits, the largest and mean absolute logit error relative to
the float logits' largest and mean absolute value, top-1 agreement, the mean KL(float || quantized), and the
perplexity each model gives the text and the float model's continuation, with its ratio to float's.

Only one model is in memory at a time: float runs first and only its logits (float32, positions x vocab) are kept.
Dummy weights make near-uniform next-token distributions at the usual std 0.02; the float model's mean entropy is
reported beside the uniform one so a run says how peaked its distributions were (--std takes several values).
A float dtype as a method (float16 beside bfloat16) is the same draws rounded differently: how far a change of
rounding alone moves a random network's logits, the floor to read the quantized methods against.

    python benchmarks/quant_agreement.py --preset bench-small --methods w8a16,w4a16-g32 --out /tmp/agree.json
    python benchmarks/quant_agreement.py --methods w8a16,w4a16,float16 --std 0.02,0.05  # llava-1.5-7b: ~14 GB, ~30 min
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llavakit.layers.attention import AttentionMetadata, KVCache
from llavakit.pipeline import load_tokenizer
from llavakit.presets import preset_config, preset_tokenizer_dir
from llavakit.quant import QuantConfig, formats
from llavakit.weights.loader import random_llava

FLOAT_DTYPES = ("bfloat16", "float16", "float32")
# Plain prose, written for this benchmark: about 330 LLaMA tokens.
TEXT = (
    "The river town woke slowly on market days. Before the sun cleared the hills, the baker had already pulled "
    "the first loaves from the oven, and the smell of warm bread drifted down the narrow street toward the "
    "harbour. Fishermen sorted their catch on the stone quay while gulls circled overhead, waiting for a chance "
    "to steal a sardine. By seven o'clock the square was full of carts: farmers brought potatoes, cabbages and "
    "baskets of apples, a woman from the next valley sold honey in small clay pots, and an old man repaired "
    "umbrellas under a striped awning. Children ran between the stalls with coins in their fists, arguing about "
    "whether to spend them on sweets or save them for the fair. The schoolteacher bought a newspaper and read it "
    "standing up, shaking her head at the price of coal. Near the fountain, two musicians tuned a violin and an "
    "accordion, and soon a slow waltz floated over the noise of the crowd. When the church bell struck noon, the "
    "traders began to pack their goods, the square emptied, and the town returned to its quiet afternoon, as it "
    "had done every week for as long as anyone could remember."
)


def log(msg: str, start: float = time.perf_counter()) -> None:
    print(f"[{time.perf_counter() - start:7.1f}s] {msg}", file=sys.stderr, flush=True)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def peak_rss_gib() -> float:
    """The process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def parse_method(name: str, dtype: str) -> tuple[str, QuantConfig | None]:
    """w8a16, w4a16 (groups of 128) or w4a16-g32 (another group size) -> (dtype, its QuantConfig); a float dtype
    -> (that dtype, None): the same draws rounded to another float format, the floor a rounding change sets."""
    if name in FLOAT_DTYPES:
        return name, None
    method, _, group = name.partition("-g")
    return dtype, QuantConfig(method, int(group) if group else None)


def text_ids(preset: str, tokens: int) -> torch.Tensor:
    """The first `tokens` ids of TEXT (BOS included) through the preset's tokenizer, (tokens,)."""
    tok_dir = preset_tokenizer_dir(preset)
    if tok_dir is None:
        raise SystemExit(f"{preset} needs its own tokenizer; use a preset with a LLaMA vocabulary (llava-1.5-7b)")
    ids = load_tokenizer(tok_dir)(TEXT).input_ids
    if len(ids) < tokens:
        raise SystemExit(f"the fixed text is {len(ids)} tokens long; pass --tokens {len(ids)} or fewer")
    return torch.tensor(ids[:tokens])


@torch.no_grad()
def run_logits(model, ids: torch.Tensor, continuation: torch.Tensor | None, steps: int) -> tuple[torch.Tensor, ...]:
    """Prefill `ids`, then `steps` decode steps on `continuation` (None: the model's own greedy picks).

    Returns the float32 logits of every next-token position (len(ids) + steps - 1, vocab) and the continuation."""
    t = model.cfg.text
    dtype = model.language_model.embed_tokens.weight.dtype
    n = ids.numel()
    cache = KVCache(t.num_hidden_layers, 1, t.num_key_value_heads, n + steps, t.head_dim, dtype, "cpu")
    hidden = model(model.embed_inputs(ids[None]), torch.arange(n)[None], cache)  # (1, n, D)
    rows = [model.compute_logits(hidden[0]).float()]
    picked = []
    for i in range(steps - 1):
        token = rows[-1][-1].argmax() if continuation is None else continuation[i]
        picked.append(int(token))
        hidden = model(model.embed_inputs(token.view(1, 1)), torch.tensor([[n + i]]), cache,
                       AttentionMetadata(start_pos=n + i))
        rows.append(model.compute_logits(hidden[0]).float())
        if (i + 1) % 8 == 0:
            log(f"  decode step {i + 1}/{steps - 1}")
    if continuation is None:
        picked.append(int(rows[-1][-1].argmax()))
        continuation = torch.tensor(picked)
    return torch.cat(rows), continuation


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return math.exp(F.cross_entropy(logits, targets).item())


def agreement(ref: torch.Tensor, got: torch.Tensor, targets: torch.Tensor, n_text: int) -> dict:
    """`got` against the float logits `ref` (positions x vocab) whose next tokens are `targets`."""
    err = (got - ref).abs()
    logp_ref, logp = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1)
    return {
        "cosine": F.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item(),
        "cosine_per_position_min": F.cosine_similarity(got, ref, dim=-1).min().item(),
        "max_abs_error_rel": (err.max() / ref.abs().max()).item(),
        "mean_abs_error_rel": (err.mean() / ref.abs().mean()).item(),
        "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "top1_agreement_continuation": (got[n_text - 1:].argmax(-1) == ref[n_text - 1:].argmax(-1))
        .float().mean().item(),
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        "ppl_text": perplexity(got[:n_text - 1], targets[:n_text - 1]),
        "ppl_continuation": perplexity(got[n_text - 1:], targets[n_text - 1:]),
    }


def float_summary(ref: torch.Tensor, targets: torch.Tensor, n_text: int) -> dict:
    """How peaked the float model's next-token distributions are, next to the uniform distribution's."""
    logp = ref.log_softmax(-1)
    return {
        "entropy_mean_nats": -(logp.exp() * logp).sum(-1).mean().item(),
        "uniform_entropy_nats": math.log(ref.shape[-1]),
        "top1_prob_mean": logp.max(-1).values.exp().mean().item(),
        "logit_std": ref.std().item(),
        "ppl_text": perplexity(ref[:n_text - 1], targets[:n_text - 1]),
        "ppl_continuation": perplexity(ref[n_text - 1:], targets[n_text - 1:]),
    }


def weight_error(hidden: int, std: float, ref_dtype: str, dtype: str, cfg: QuantConfig | None) -> float:
    """What a method does to one (hidden x hidden) N(0, std) weight: ||W' - W|| / ||W||, W in `ref_dtype` -- the
    perturbation each layer gets, before depth compounds it."""
    w = torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(0)) * std
    ref = w.to(getattr(torch, ref_dtype))
    if cfg is None:
        got = w.to(getattr(torch, dtype))
    else:
        got = formats.dequantize_weight(formats.quantize_weight(ref, cfg), cfg)
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def build(args, std: float, dtype: str, cfg: QuantConfig | None):
    return random_llava(preset_config(args.preset), getattr(torch, dtype), torch.device("cpu"),
                        seed=args.seed, std=std, quantization=cfg)


def std_run(args, std: float, ids: torch.Tensor) -> dict:
    """Float first (its logits and greedy continuation kept, the model freed), then each method in turn."""
    n = ids.numel()
    log(f"std {std}: building the float model ({args.preset}, {args.dtype})")
    model = build(args, std, args.dtype, None)
    log(f"std {std}: float forward ({n} tokens + {args.continuation} greedy)")
    ref, cont = run_logits(model, ids, None, args.continuation)
    del model
    gc.collect()
    targets = torch.cat([ids[1:], cont])
    res = {"std": std, "float": float_summary(ref, targets, n), "continuation_ids": cont.tolist(),
           "peak_rss_gib_after_float": peak_rss_gib()}
    log(f"std {std}: float entropy {res['float']['entropy_mean_nats']:.2f} nats "
        f"(uniform {res['float']['uniform_entropy_nats']:.2f}), ppl text {res['float']['ppl_text']:.1f}")
    for name in args.methods.split(","):
        log(f"std {std}: building {name}")
        model = build(args, std, *parse_method(name, args.dtype))
        got, _ = run_logits(model, ids, cont, args.continuation)
        del model
        gc.collect()
        m = {"weight_error_rel": weight_error(preset_config(args.preset).text.hidden_size, std, args.dtype,
                                              *parse_method(name, args.dtype)),
             **agreement(ref, got, targets, n)}
        for key in ("ppl_text", "ppl_continuation"):
            m[key + "_ratio"] = m[key] / res["float"][key]
        res[name] = m
        res[f"peak_rss_gib_after_{name}"] = peak_rss_gib()
        log(f"std {std}: {name}: cosine {m['cosine']:.5f}, top-1 {m['top1_agreement']:.3f}, "
            f"KL {m['kl_mean']:.2e}, ppl ratio text {m['ppl_text_ratio']:.4f} cont {m['ppl_continuation_ratio']:.4f}")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llava-1.5-7b")
    p.add_argument("--dtype", default="bfloat16", choices=FLOAT_DTYPES)
    p.add_argument("--tokens", type=int, default=128, help="tokens of the fixed text (BOS included)")
    p.add_argument("--continuation", type=int, default=32, help="greedy tokens the float model adds")
    p.add_argument("--methods", default="w8a16,w4a16",
                   help="comma list; w4a16-g32 picks another group size, a float dtype (float16) the same draws in it")
    p.add_argument("--std", default="0.02", help="comma list of the dummy weights' standard deviations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/quant_agreement_<preset>_cpu-<N>c_<date>.json)")
    args = p.parse_args()
    if args.tokens < 2 or args.continuation < 1:
        p.error("--tokens must be at least 2 and --continuation at least 1")
    for name in args.methods.split(","):
        try:
            parse_method(name, args.dtype)
        except ValueError as e:
            p.error(f"--methods: {name}: {e}")
    torch.set_num_threads(args.threads)
    date = datetime.date.today().isoformat()
    name = f"quant_agreement_{args.preset}_cpu-{os.cpu_count()}c_{date}.json"
    out = args.out or Path(__file__).parent / "results" / name
    ids = text_ids(args.preset, args.tokens)
    report = {"date": date, "machine": f"{os.cpu_count()}-core CPU {cpu_name()}",
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
              "threads": args.threads, "preset": args.preset, "dtype": args.dtype, "seed": args.seed,
              "text_tokens": args.tokens, "continuation_tokens": args.continuation, "methods": args.methods,
              "command": " ".join(["python", *sys.argv]), "load_average_before": os.getloadavg(), "runs": []}
    start = time.perf_counter()
    for std in (float(s) for s in args.std.split(",")):
        report["runs"].append(std_run(args, std, ids))
        report["peak_rss_gib"] = peak_rss_gib()
        report["seconds"] = round(time.perf_counter() - start, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")  # after each std, so a long run keeps what it has
    log(f"wrote {out}; peak RSS {report['peak_rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
