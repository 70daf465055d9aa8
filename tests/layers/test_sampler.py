"""Batched sampling with per-request settings, on hand-made logits with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from llavakit.layers.sampler import (
    apply_presence_frequency,
    apply_repetition_penalty,
    filter_min_p,
    filter_top_k_top_p,
    sample_batch,
)
from llavakit.sampling import SamplingParams

V = 50


def _gen(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


def _sample(logits, params, seen=None, generated=None, seeds=None):
    b = logits.shape[0]
    seeds = seeds or [None] * b
    return sample_batch(logits, params, seen or [[]] * b, generated or [[]] * b, [_gen(s) for s in seeds])


def test_greedy_rows_are_argmax():
    logits = torch.randn(5, V)
    tokens, logprobs = _sample(logits, [SamplingParams()] * 5)
    assert tokens == logits.argmax(-1).tolist() and logprobs == [None] * 5


def test_seeded_row_is_the_same_alone_or_batched():
    logits = torch.randn(4, V)
    hot = SamplingParams(temperature=1.3, top_k=20, top_p=0.9, min_p=0.02, seed=7)
    alone = [_sample(logits[2:3], [hot], seeds=[7])[0][0] for _ in range(3)]
    mixed = [SamplingParams(), SamplingParams(temperature=0.7), hot, SamplingParams(temperature=2.0, top_k=3)]
    batched = [_sample(logits, mixed, seeds=[None, 1, 7, 99])[0][2] for _ in range(3)]
    assert alone == batched
    # a sequence of draws from one generator reproduces too
    draws = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(7)
        draws.append([sample_batch(logits[2:3], [hot], [[]], [[]], [gen])[0][0] for _ in range(20)])
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_matches_a_direct_multinomial_draw():
    """Without min-p or penalties a row draws what multinomial over the filtered softmax draws."""
    logits = torch.randn(1, V)
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.85)
    for seed in range(5):
        probs = filter_top_k_top_p(logits[0] / 0.8, 10, 0.85).softmax(-1)
        want = int(torch.multinomial(probs, 1, generator=_gen(seed)))
        assert _sample(logits, [params], seeds=[seed])[0] == [want]


def test_filters_on_hand_made_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = lambda params: {_sample(logits, [params], seeds=[s])[0][0] for s in range(200)}  # noqa: E731
    assert draws(SamplingParams(temperature=1.0)) == {0, 1, 2, 3}
    assert draws(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    assert draws(SamplingParams(temperature=1.0, top_p=0.8)) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert draws(SamplingParams(temperature=1.0, top_p=0.81)) == {0, 1, 2}
    assert draws(SamplingParams(temperature=1.0, min_p=0.25)) == {0, 1, 2}  # 0.15 >= 0.125 > 0.05
    assert draws(SamplingParams(temperature=1.0, min_p=0.7)) == {0}  # 0.3 < 0.35
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
    kept = filter_min_p(probs, 0.5)
    assert torch.equal(kept, torch.tensor([[0.5, 0.3, 0.0, 0.0], [0.0, 0.2, 0.3, 0.4]]))


def test_presence_and_frequency_penalties_by_hand():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    generated = [3, 1, 3, 3]  # token 3 three times, token 1 once
    out = apply_presence_frequency(logits, generated, presence=0.5, frequency=0.25)
    assert torch.equal(out, torch.tensor([1.0, 2.0 - 0.5 - 0.25, 3.0, 4.0 - 0.5 - 0.75, 5.0]))
    assert torch.equal(apply_presence_frequency(logits, {3: 3, 1: 1}, 0.5, 0.25), out)
    # through sample_batch: the prompt (seen) does not count, only generated tokens do
    row = torch.tensor([[0.0, 0.0, 1.0, 1.2]])
    params = SamplingParams(presence_penalty=1.0, logprobs=4)
    tokens, lps = sample_batch(row, [params], [[3, 3, 2]], [[3]], [None])
    assert tokens == [2]
    assert dict(lps[0].top)[3] == pytest.approx(torch.tensor([0.0, 0.0, 1.0, 0.2]).log_softmax(-1)[3].item())


def test_repetition_penalty_equals_the_single_sequence_rule():
    logits = torch.randn(3, V)
    seen = [[1, 4, 4, 9], [], [0, 49, 7]]
    params = [SamplingParams(repetition_penalty=1.3, logprobs=20)] * 3
    _, lps = sample_batch(logits, params, seen, [[]] * 3, [None] * 3)
    for i in range(3):
        want = apply_repetition_penalty(logits[i], torch.tensor(seen[i], dtype=torch.long), 1.3).log_softmax(-1)
        for token, lp in lps[i].top:
            assert lp == pytest.approx(want[token].item(), abs=1e-6)
        assert [t for t, _ in lps[i].top] == want.topk(20).indices.tolist()
    assert sample_batch(logits, params, seen, [[]] * 3, [None] * 3)[0] == [
        int(apply_repetition_penalty(logits[i], torch.tensor(seen[i], dtype=torch.long), 1.3).argmax())
        for i in range(3)]


def test_logprobs_are_a_consistent_distribution():
    logits = torch.randn(3, V) * 3
    params = [SamplingParams(temperature=0.7, top_k=5, logprobs=5), SamplingParams(), SamplingParams(logprobs=0)]
    tokens, lps = _sample(logits, params, seeds=[3, None, None])
    assert lps[1] is None and lps[2].top == [] and lps[2].token_id == tokens[2]
    full = logits.log_softmax(-1)
    for i in (0, 2):
        assert lps[i].logprob == pytest.approx(full[i, tokens[i]].item(), abs=1e-6)  # before temperature
    top = lps[0].top
    assert len(top) == 5 and sum(math.exp(lp) for _, lp in top) <= 1 + 1e-6
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    assert tokens[0] in [t for t, _ in top]  # top_k=5 sampled from the same five


def test_caller_logits_are_not_modified():
    logits = torch.randn(2, V)
    before = logits.clone()
    _sample(logits, [SamplingParams(repetition_penalty=2.0, presence_penalty=1.0)] * 2, seen=[[1, 2], [3]],
            generated=[[1], [3, 3]])
    assert torch.equal(logits, before)


def test_row_count_mismatch_raises():
    with pytest.raises(ValueError, match="one entry per row: 2 rows, 1 params"):
        sample_batch(torch.randn(2, V), [SamplingParams()], [[]], [[]], [None])


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_p=1.5), "min_p must be in"), (dict(min_p=-0.1), "min_p must be in"),
    (dict(presence_penalty=2.5), "presence_penalty must be in"),
    (dict(frequency_penalty=-3), "frequency_penalty must be in"),
    (dict(n=0), "n \\(completions per request\\) must be at least 1"),
    (dict(logprobs=21), "logprobs must be None or in \\[0, 20\\]"), (dict(logprobs=-1), "logprobs must be"),
])
def test_sampling_params_validates_new_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_new_defaults_disable_everything():
    p = SamplingParams(n=3, logprobs=0, min_p=0.1, presence_penalty=-2, frequency_penalty=2)
    assert (p.n, p.logprobs, p.min_p) == (3, 0, 0.1)
    d = SamplingParams()
    assert (d.min_p, d.presence_penalty, d.frequency_penalty, d.n, d.logprobs) == (0.0, 0.0, 0.0, 1, None)


def test_tiny_top_p_keeps_the_most_likely_token():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9]])
    for top_p in (5e-324, 1e-9, 0.0):
        kept = filter_top_k_top_p(logits, 0, top_p)
        assert torch.isfinite(kept).tolist() == [[False, True, False, False]]
