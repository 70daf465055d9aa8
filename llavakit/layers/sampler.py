"""Token selection from logits: repetition penalty, temperature, top-k, top-p, greedy.

The order is transformers' (penalty, temperature, top-k, top-p), so seeded sampling is comparable.
"""

from __future__ import annotations

import torch


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
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator | None) -> int:
    """One token id from logits (V,); temperature 0 is greedy."""
    if temperature == 0:
        return int(logits.argmax())
    logits = filter_top_k_top_p(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
