"""Which of two caption sets is better, by paired CLIP scores: MindIE's precision protocol made statistical.

MindIE's protocol captions the same 100 COCO images on two implementations and calls the higher mean CLIP
score more precise. A difference of means says nothing of noise, so here the items are paired by
question_id, the per-item difference d = score_B - score_A is averaged, and a seeded percentile bootstrap
over the pairs (10,000 resamples by default) gives its 95% confidence interval. Verdict: "B better" when
the whole interval is above 0, "A better" when it is below, otherwise "no significant difference".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_CELLS_PER_CHUNK = 2_000_000  # resample indices drawn at once: bounds memory for large files


def pair_scores(a: dict[str, dict], b: dict[str, dict]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(shared ids in A's order, A's scores, B's scores); an error when no id is shared or a shared id
    names different images in the two files (then they are not captions of the same pictures)."""
    ids = [q for q in a if q in b]
    if not ids:
        raise ValueError(f"the two files share no question_id (A has {len(a)}, B has {len(b)}); compare captions "
                         "of the same questions")
    for q in ids:
        image_a, image_b = a[q].get("image"), b[q].get("image")
        if image_a and image_b and image_a != image_b:
            raise ValueError(f"question {q} is image {image_a} in A but {image_b} in B; the files must caption "
                             "the same images")
    return ids, np.array([a[q]["clip_score"] for q in ids]), np.array([b[q]["clip_score"] for q in ids])


def bootstrap_mean_ci(diffs: np.ndarray, resamples: int = 10_000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `diffs`: resample the pairs with replacement."""
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and resamples >= 1; got {confidence} and {resamples}")
    n = len(diffs)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CELLS_PER_CHUNK // n)
    means = np.concatenate([diffs[rng.integers(0, n, size=(min(chunk, resamples - start), n))].mean(axis=1)
                            for start in range(0, resamples, chunk)])
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def verdict(ci_low: float, ci_high: float) -> str:
    """B better / A better when the interval of mean(B - A) lies wholly above / below zero."""
    if ci_low > 0:
        return "B better"
    if ci_high < 0:
        return "A better"
    return "no significant difference"


def compare_scores(a: dict[str, dict], b: dict[str, dict], resamples: int = 10_000, confidence: float = 0.95,
                   seed: int = 0) -> tuple[dict, list[dict]]:
    """The comparison summary and the per-pair rows {question_id, image, score_a, score_b, difference}."""
    ids, sa, sb = pair_scores(a, b)
    if len(ids) < 2:
        raise ValueError(f"only {len(ids)} question is in both files; a confidence interval needs at least 2 pairs")
    diffs = sb - sa
    low, high = bootstrap_mean_ci(diffs, resamples, confidence, seed)
    summary = {"n": len(ids), "mean_a": float(sa.mean()), "mean_b": float(sb.mean()),
               "mean_difference": float(diffs.mean()), "ci_low": low, "ci_high": high, "confidence": confidence,
               "resamples": resamples, "seed": seed, "verdict": verdict(low, high),
               "only_in_a": len(a) - len(ids), "only_in_b": len(b) - len(ids)}
    pairs = [{"question_id": a[q].get("question_id", q), "image": a[q].get("image") or b[q].get("image"),
              "score_a": float(x), "score_b": float(y), "difference": float(y - x)}
             for q, x, y in zip(ids, sa, sb, strict=True)]
    return summary, pairs


def format_comparison(result: dict, name_a: str, name_b: str) -> str:
    """A few plain lines: both means, the difference with its interval, the verdict in words."""
    pct = round(100 * result["confidence"])
    lines = [f"A  {name_a}: mean CLIP score {result['mean_a']:.3f}",
             f"B  {name_b}: mean CLIP score {result['mean_b']:.3f}",
             f"pairs {result['n']} (only in A: {result['only_in_a']}, only in B: {result['only_in_b']})",
             (f"B - A {result['mean_difference']:+.3f}, {pct}% CI [{result['ci_low']:+.3f}, {result['ci_high']:+.3f}] "
              f"({result['resamples']} bootstrap resamples, seed {result['seed']})")]
    named = {"B better": f"B better ({name_b})", "A better": f"A better ({name_a})"}
    return "\n".join(lines + [f"verdict: {named.get(result['verdict'], result['verdict'])}"])


def plot_differences(differences: list[float], result: dict, path: str | Path, names: tuple[str, str]) -> None:
    """Histogram of the per-pair differences with the mean and its bootstrap interval shaded; a PNG."""
    # A bare Figure renders with Agg and touches no pyplot state (no global backend switch).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(differences, bins=min(40, max(5, len(differences) // 3)), color="#8aa6c1", edgecolor="white")
    ax.axvline(0, color="black", linestyle="--", linewidth=1, label="no difference")
    ax.axvspan(result["ci_low"], result["ci_high"], color="#d62728", alpha=0.2,
               label=f"{round(100 * result['confidence'])}% CI of the mean")
    ax.axvline(result["mean_difference"], color="#d62728", linewidth=2,
               label=f"mean {result['mean_difference']:+.2f}")
    ax.set_xlabel(f"CLIP score difference per image, B - A  (A = {names[0]}, B = {names[1]})")
    ax.set_ylabel("images")
    ax.set_title(f"{result['verdict']} (n = {result['n']})")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
