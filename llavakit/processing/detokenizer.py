"""Incremental detokenization: text appears as tokens arrive, never a half-decoded character; and
TextStream, where stop token ids and stop strings end an answer."""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Feed token ids one by one; each call returns the new text they complete (maybe "")."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # decoding restarts a few tokens back so word-initial spaces come out right
        self.read_offset = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence or a token with no text yet
        delta = after[len(before):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta


class TextStream:
    """One answer's text as its tokens arrive: detokenized, ended by a stop token id (which adds no text) or
    cut before the first stop string, with any tail that could still begin a stop string held back from
    `visible`. The plain loop and the engine both decide "stop" here, and only here."""

    def __init__(self, tokenizer: Any, stops: list[str], stop_ids: set[int] | frozenset[int] = frozenset()):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops, self.stop_ids = stops, stop_ids
        self.stopped = False
        self._cut: int | None = None

    def push(self, token_id: int) -> bool:
        """Take the next token; True once the answer has ended (a stop id or a stop string)."""
        if self.stopped:
            return True
        if token_id in self.stop_ids:
            self.stopped = True
            return True
        self.detok.push(token_id)
        self._cut = find_stop(self.detok.text, self.stops)
        self.stopped = self._cut is not None
        return self.stopped

    @property
    def text(self) -> str:
        """The answer so far, stop string and what follows it cut off."""
        return self.detok.text if self._cut is None else self.detok.text[:self._cut]

    @property
    def visible(self) -> str:
        """What may be shown now: `text` minus a tail that could begin a stop string (all of it once stopped)."""
        if self.stopped:
            return self.text
        text = self.detok.text
        return text[:len(text) - partial_stop_length(text, self.stops)]


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in `text`, None when there is none."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def partial_stop_length(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could begin a stop string: held back from the stream."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
