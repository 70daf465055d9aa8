"""benchmarks/quant_agreement.py end to end on bench-small: the report's fields, and the order of the methods'
agreement with float: float16 rounding closest, then int8, then int4."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "quant_agreement.py"
METRICS = ("weight_error_rel", "cosine", "max_abs_error_rel", "mean_abs_error_rel", "top1_agreement", "kl_mean",
           "ppl_text", "ppl_continuation", "ppl_text_ratio", "ppl_continuation_ratio")


def test_agreement_script_bench_small(tmp_path):
    out = tmp_path / "agree.json"
    subprocess.run([sys.executable, str(SCRIPT), "--preset", "bench-small", "--methods", "w8a16,w4a16-g32,float16",
                    "--tokens", "24", "--continuation", "6", "--out", str(out)],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    report = json.loads(out.read_text())
    assert report["preset"] == "bench-small" and report["date"] and report["machine"]
    (run,) = report["runs"]
    assert run["std"] == 0.02 and len(run["continuation_ids"]) == 6
    assert run["float"]["entropy_mean_nats"] <= run["float"]["uniform_entropy_nats"]
    w8, w4, f16 = run["w8a16"], run["w4a16-g32"], run["float16"]
    for m in (w8, w4, f16):
        assert set(METRICS) <= set(m)
    # one layer's weight: ~0.17% (bf16 -> fp16), ~0.8% (int8 per channel), ~9.5% (int4, groups of 32)
    assert f16["weight_error_rel"] < 0.003 < w8["weight_error_rel"] < 0.012 < 0.05 < w4["weight_error_rel"] < 0.15
    assert f16["cosine"] > w8["cosine"] and f16["kl_mean"] < w8["kl_mean"]
    # measured 0.9992 / 0.936 cosine, KL 1e-4 / 1.3e-2 (128 tokens)
    assert w8["cosine"] > 0.998 and w8["kl_mean"] < 1e-3 and w8["top1_agreement"] > 0.8
    assert w4["cosine"] < w8["cosine"] and w4["kl_mean"] > w8["kl_mean"]
    assert w8["max_abs_error_rel"] < w4["max_abs_error_rel"] and w8["top1_agreement"] >= w4["top1_agreement"]
    assert abs(w8["ppl_text_ratio"] - 1) < 0.01
