"""Token selection from logits: penalties, temperature, top-k, top-p, min-p, greedy, logprobs.

The order is transformers' (penalty, temperature, top-k, top-p) then min-p as vLLM applies it, so seeded
sampling is comparable. `sample_batch` serves both the plain loop (one row) and the engine's batch, where
every row has its own SamplingParams and random generator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from llavakit.sampling import SamplingParams

TokenIds = torch.Tensor | Sequence[int]


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (V,), seen_ids (N,): divide positive / multiply negative scores of tokens already seen."""
    if penalty == 1.0 or seen_ids.numel() == 0:
        return logits
    ids = seen_ids[(seen_ids >= 0) & (seen_ids < logits.shape[-1])].unique()
    scores = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the top k and outside the smallest set holding top_p mass."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        drop[..., 0] = False  # the most likely token always stays, however small top_p is (even 5e-324)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@dataclass(slots=True)
class TopLogprobs:
    """Log-probabilities around one sampled token.

    They come from the distribution after the repetition/presence/frequency penalties and before
    temperature and top-k/top-p/min-p filtering: the model's view of the token, adjusted by what the
    request asked to discourage, and independent of how randomly it samples. (vLLM's default returns the
    raw model logprobs, before penalties; for requests without penalties the two agree.)
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first; `params.logprobs` entries


def apply_presence_frequency(logits: torch.Tensor, generated: Mapping[int, int] | TokenIds, presence: float,
                             frequency: float) -> torch.Tensor:
    """logits (V,) -= presence * (count > 0) + frequency * count, counting generated tokens only (OpenAI).

    `generated` is a {token id: count} mapping or the generated ids themselves.
    """
    if presence == 0 and frequency == 0:
        return logits
    if isinstance(generated, Mapping):
        ids = torch.tensor(list(generated.keys()), dtype=torch.long, device=logits.device)
        counts = torch.tensor(list(generated.values()), dtype=logits.dtype, device=logits.device)
    else:
        ids, counts = torch.as_tensor(generated, dtype=torch.long, device=logits.device).unique(return_counts=True)
        counts = counts.to(logits.dtype)
    if ids.numel() == 0:
        return logits
    logits = logits.clone()
    logits[ids] -= presence * (counts > 0).to(logits.dtype) + frequency * counts
    return logits


def apply_penalties(logits: torch.Tensor, params: SamplingParams, seen: TokenIds,
                    generated: Mapping[int, int] | TokenIds) -> torch.Tensor:
    """logits (V,): repetition penalty over prompt + output, then presence/frequency over the output."""
    if params.repetition_penalty != 1.0:
        seen_ids = torch.as_tensor(seen, dtype=torch.long, device=logits.device)
        logits = apply_repetition_penalty(logits, seen_ids, params.repetition_penalty)
    return apply_presence_frequency(logits, generated, params.presence_penalty, params.frequency_penalty)


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0 or p.frequency_penalty != 0


def filter_min_p(probs: torch.Tensor, min_p: float) -> torch.Tensor:
    """Zero every probability below min_p times the largest one (the rest need not sum to 1)."""
    if min_p <= 0:
        return probs
    return probs.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, 0.0)


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from penalised logits (V,) with temperature > 0: temperature, top-k, top-p, min-p."""
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = filter_min_p(logits.softmax(-1), params.min_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def top_logprobs(logits: torch.Tensor, tokens: list[int], counts: list[int]) -> list[TopLogprobs]:
    """logits (R, V) penalised, the chosen token per row, and how many top entries each row wants."""
    logprobs = logits.log_softmax(-1)  # (R, V)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    top_values, top_ids = logprobs.topk(max(counts), dim=-1)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [TopLogprobs(t, c, list(zip(ids[:k], values[:k], strict=True)))
            for t, c, ids, values, k in zip(tokens, chosen, top_ids, top_values, counts, strict=True)]


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], seen: list[TokenIds],
                 generated: list[Mapping[int, int] | TokenIds],
                 generators: list[torch.Generator | None]) -> tuple[list[int], list[TopLogprobs | None]]:
    """One token per row of logits (B, V), each row under its own request's settings.

    seen[i]: row i's prompt + output ids (repetition penalty); generated[i]: its generated ids or their
    counts (presence/frequency penalties); generators[i]: its random generator (on the logits' device), so
    a seeded request draws the same tokens whatever else shares the batch. Greedy rows take one argmax.
    Returns the token ids and, for rows whose params.logprobs is not None, their `TopLogprobs`.
    """
    b = logits.shape[0]
    if not b == len(params) == len(seen) == len(generated) == len(generators):
        raise ValueError(f"sample_batch needs one entry per row: {b} rows, {len(params)} params, {len(seen)} "
                         f"seen, {len(generated)} generated, {len(generators)} generators")
    logits = logits.float()
    penalised = [i for i, p in enumerate(params) if _has_penalty(p)]
    if penalised:
        logits = logits.clone()  # the caller's tensor stays as it was
        for i in penalised:
            logits[i] = apply_penalties(logits[i], params[i], seen[i], generated[i])
    # One argmax over every row when any is greedy: cheaper than copying the greedy rows out first.
    tokens = logits.argmax(-1).tolist() if any(p.greedy for p in params) else [0] * b
    for i, p in enumerate(params):
        if not p.greedy:
            tokens[i] = sample_row(logits[i], p, generators[i])
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    logprobs: list[TopLogprobs | None] = [None] * b
    if wanted:
        found = top_logprobs(logits[wanted], [tokens[i] for i in wanted], [params[i].logprobs for i in wanted])
        for i, lp in zip(wanted, found, strict=True):
            logprobs[i] = lp
    return tokens, logprobs
