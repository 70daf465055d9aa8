"""Paired comparison of two caption sets: pairing, the bootstrap interval, the verdict, the plot."""

import numpy as np
import pytest
from PIL import Image

from llavakit.eval.compare import (
    bootstrap_mean_ci,
    compare_scores,
    format_comparison,
    pair_scores,
    plot_differences,
    verdict,
)


def _scores(values: dict) -> dict[str, dict]:
    return {q: {"question_id": q, "image": f"{q}.jpg", "clip_score": v} for q, v in values.items()}


def test_bootstrap_interval_matches_the_normal_approximation_for_many_pairs():
    diffs = np.random.default_rng(1).normal(0.5, 2.0, size=2000)
    low, high = bootstrap_mean_ci(diffs, resamples=4000, seed=3)
    half = 1.96 * diffs.std(ddof=1) / np.sqrt(len(diffs))  # ~0.088
    assert low == pytest.approx(diffs.mean() - half, abs=0.01)
    assert high == pytest.approx(diffs.mean() + half, abs=0.01)


def test_bootstrap_is_seeded_and_narrows_with_confidence():
    diffs = np.random.default_rng(0).normal(0, 1, size=50)
    assert bootstrap_mean_ci(diffs, 2000, seed=7) == bootstrap_mean_ci(diffs, 2000, seed=7)
    assert bootstrap_mean_ci(diffs, 2000, seed=7) != bootstrap_mean_ci(diffs, 2000, seed=8)
    low95, high95 = bootstrap_mean_ci(diffs, 2000, 0.95, seed=7)
    low50, high50 = bootstrap_mean_ci(diffs, 2000, 0.50, seed=7)
    assert low95 < low50 < diffs.mean() < high50 < high95


def test_drawing_the_resamples_in_chunks_does_not_change_the_interval(monkeypatch):
    diffs = np.random.default_rng(0).normal(size=37)
    whole = bootstrap_mean_ci(diffs, resamples=1000, seed=1)
    monkeypatch.setattr("llavakit.eval.compare._CELLS_PER_CHUNK", 37 * 3)  # 334 chunks of 3 resamples
    assert bootstrap_mean_ci(diffs, resamples=1000, seed=1) == whole


@pytest.mark.parametrize("shift, expected", [(1.0, "B better"), (-1.0, "A better"), (0.0, "no significant difference")])
def test_verdict_follows_the_interval(shift, expected):
    rng = np.random.default_rng(5)
    a = rng.normal(30, 2, size=100)
    noise = rng.normal(0, 0.3, size=100)
    b = a + shift + noise - noise.mean()  # mean difference exactly `shift`
    summary, pairs = compare_scores(_scores(dict(enumerate(a))), _scores(dict(enumerate(b))), resamples=2000)
    assert summary["verdict"] == expected
    assert summary["mean_difference"] == pytest.approx(shift, abs=1e-9)
    assert summary["ci_low"] <= shift <= summary["ci_high"]
    assert pairs[3]["difference"] == pytest.approx(b[3] - a[3])


def test_verdict_needs_the_whole_interval_on_one_side():
    assert verdict(0.1, 0.5) == "B better" and verdict(-0.5, -0.1) == "A better"
    assert verdict(0.0, 0.5) == verdict(-0.1, 0.1) == "no significant difference"


def test_identical_captions_are_no_difference():
    summary, _ = compare_scores(_scores({"1": 30.0, "2": 31.0}), _scores({"1": 30.0, "2": 31.0}))
    assert (summary["ci_low"], summary["ci_high"], summary["verdict"]) == (0.0, 0.0, "no significant difference")


def test_pairs_are_by_question_id_and_unpaired_items_are_counted():
    a, b = _scores({"1": 10.0, "2": 20.0, "3": 30.0}), _scores({"3": 33.0, "1": 11.0, "9": 1.0})
    ids, sa, sb = pair_scores(a, b)
    assert ids == ["1", "3"] and sa.tolist() == [10.0, 30.0] and sb.tolist() == [11.0, 33.0]
    summary, _ = compare_scores(a, b)
    assert (summary["n"], summary["only_in_a"], summary["only_in_b"]) == (2, 1, 1)
    assert summary["mean_a"] == 20.0 and summary["mean_b"] == 22.0


def test_mismatched_files_are_clear_errors():
    with pytest.raises(ValueError, match="share no question_id"):
        pair_scores(_scores({"1": 1.0}), _scores({"2": 1.0}))
    b = _scores({"1": 1.0, "2": 2.0})
    b["2"]["image"] = "other.jpg"
    with pytest.raises(ValueError, match="question 2 is image 2.jpg in A but other.jpg in B"):
        pair_scores(_scores({"1": 1.0, "2": 2.0}), b)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        compare_scores(_scores({"1": 1.0}), _scores({"1": 2.0}))


def test_text_report_names_the_better_file():
    summary, _ = compare_scores(_scores({"1": 10.0, "2": 20.0, "3": 30.0}), _scores({"1": 12.0, "2": 22.0, "3": 32.0}))
    text = format_comparison(summary, "gpu.jsonl", "npu.jsonl")
    assert "B - A +2.000, 95% CI [+2.000, +2.000]" in text
    assert text.endswith("verdict: B better (npu.jsonl)")


def test_plot_writes_a_png(tmp_path):
    summary, pairs = compare_scores(_scores({str(i): float(i) for i in range(30)}),
                                    _scores({str(i): i + np.sin(i) for i in range(30)}), resamples=500)
    out = tmp_path / "diff.png"
    plot_differences([p["difference"] for p in pairs], summary, out, ("a.jsonl", "b.jsonl"))
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (840, 480)
