"""Relative scores of judge reviews, as LLaVA's `llava/eval/summarize_gpt_review.py` computes them.

Per category and "all": the mean [reference, model] score pair over the reviews, each mean rounded to 3
decimals, and the relative score 100 * model / reference computed from those rounded means and rounded to 1
decimal. Replies without a score pair ([-1, -1]) count in the means, as in the original; they are reported
so that they can be asked again.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from llavakit import datafiles
from llavakit.eval.review import REVIEWS_FORMAT, UNSCORED

COLUMNS = ("count", "reference", "model", "relative", "unscored")


def review_name(path: str | Path) -> str:
    """The name the original prints for a review file: its file name without 'gpt4_text_' and '.jsonl'."""
    return Path(path).name.replace("gpt4_text_", "").replace(".jsonl", "")


def _score_pair(row: datafiles.Record) -> list[float]:
    """A review's [reference, model] scores: its 'tuple' (llavakit's and LLaVA's visual reviews) or 'score'."""
    pair = row["tuple"] if "tuple" in row else row["score"]
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, int | float) for x in pair)):
        raise datafiles.DataFileError(f"{row.where}: the score pair is {pair!r}; expected two numbers "
                                      f"({REVIEWS_FORMAT})")
    return pair


def summarize_reviews(rows: list[datafiles.Record], ignore: set[str] = frozenset()) -> dict[str, dict]:
    """{category: {"count", "reference", "model", "relative", "unscored"}}, "all" included, categories in
    sorted order as the original prints them. `ignore`: question ids (compared as text) left out.
    "relative" is None when the reference mean is 0."""
    pairs: dict[str, list[list[float]]] = defaultdict(list)
    for row in rows:
        if str(row["question_id"]) in ignore:
            continue
        pair = _score_pair(row)
        if "category" in row:
            pairs[str(row["category"])].append(pair)
        pairs["all"].append(pair)
    return {category: _stats(pairs[category]) for category in sorted(pairs)}


def _stats(pairs: list[list[float]]) -> dict:
    # numpy's mean, as the original takes it: its pairwise sum can differ from sum() in the last bit
    reference, model = (round(x, 3) for x in np.asarray(pairs, dtype=np.float64).mean(0).tolist())
    relative = round(model / reference * 100, 1) if reference else None
    return {"count": len(pairs), "reference": reference, "model": model, "relative": relative,
            "unscored": sum(list(pair) == UNSCORED for pair in pairs)}


def summarize_file(path: str | Path, ignore: set[str] = frozenset()) -> dict[str, dict]:
    """summarize_reviews of one review file; an error naming it when it holds no review."""
    rows = datafiles.read_jsonl(path, REVIEWS_FORMAT)
    summary = summarize_reviews(rows, ignore)
    if not summary:
        raise datafiles.DataFileError(f"{path} has no review{' left after --ignore' if rows else ''}; expected "
                                      f"{REVIEWS_FORMAT}")
    return summary


def format_summary(name: str, summary: dict[str, dict]) -> str:
    """A plain-text table: the file's name, then one row per category."""
    table = [["category", *COLUMNS]] + [[category, *("-" if stats[c] is None else str(stats[c]) for c in COLUMNS)]
                                        for category, stats in summary.items()]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join([name] + ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                               for line in table])
