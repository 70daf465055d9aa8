"""The CLIP judge's tokenizer: open_clip's `SimpleTokenizer` results, computed by transformers' CLIPTokenizer.

open_clip and Hugging Face ship the same OpenAI byte-level BPE in two layouts: open_clip's
`bpe_simple_vocab_16e6.txt.gz` (merges only; the vocabulary is derived from them) and the Hugging Face
`tokenizer.json` / `vocab.json` + `merges.txt`. Either is turned into a transformers `CLIPTokenizer`
(the `tokenizers` library does the BPE); the text cleaning and the framing are open_clip's: ftfy +
HTML unescape + whitespace folding, then [start] tokens [end], cut to the context length with the last
kept token replaced by [end], zero-padded — the end token must survive truncation because the text tower
reads its features there.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import re
from pathlib import Path

import torch

OPEN_CLIP_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
_HF_FILES = ("tokenizer.json", "vocab.json")
_WHITESPACE = re.compile(r"\s+")


def _byte_tokens() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 bytes, in open_clip's vocabulary order: the printable
    bytes as themselves first, then the others mapped to chr(256 + n) in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + n) for n in range(len(others))]


def read_open_clip_vocab(path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) from open_clip's BPE file: bytes, bytes + "</w>", one token per merge, then the
    two special tokens — the order that gives OpenAI's ids (49406 start, 49407 end for the full file)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1] if m.strip()]  # open_clip keeps 48894
    byte_tokens = _byte_tokens()
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    tokens += ["<start_of_text>", "<end_of_text>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clean_text(text: str) -> str:
    """open_clip's default cleaning ("lower" mode's first steps): ftfy, HTML unescape twice, fold whitespace.
    Lower-casing is left to the tokenizer's normalizer."""
    import ftfy  # an `eval` extra; imported here so scoring code stays importable without it

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _WHITESPACE.sub(" ", text.strip()).strip()


class ClipTokenizer:
    """Texts -> (N, context_length) int64 ids in open_clip's framing; `truncated` says which were cut."""

    def __init__(self, backend, start_id: int, end_id: int, context_length: int = 77):
        self.backend, self.start_id, self.end_id = backend, start_id, end_id
        self.context_length = context_length

    @classmethod
    def from_file(cls, path: str | Path, context_length: int = 77) -> ClipTokenizer:
        """From open_clip's BPE file or a Hugging Face CLIP tokenizer (a folder, or its tokenizer.json)."""
        from transformers import CLIPTokenizer

        path = Path(path)
        if path.is_dir() or path.name == "tokenizer.json":
            folder = path if path.is_dir() else path.parent
            backend = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
            return cls(backend, backend.bos_token_id, backend.eos_token_id, context_length)
        vocab, merges = read_open_clip_vocab(path)
        backend = CLIPTokenizer(vocab=vocab, merges=merges, bos_token="<start_of_text>",
                                eos_token="<end_of_text>", unk_token="<end_of_text>", pad_token="<end_of_text>")
        return cls(backend, vocab["<start_of_text>"], vocab["<end_of_text>"], context_length)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        pieces = self.backend([clean_text(t) for t in texts], add_special_tokens=False)["input_ids"]
        ids = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        truncated = []
        for row, piece in zip(ids, pieces, strict=True):
            tokens = [self.start_id, *piece, self.end_id]
            truncated.append(len(tokens) > self.context_length)
            tokens = tokens[: self.context_length]
            tokens[-1] = self.end_id
            row[: len(tokens)] = torch.tensor(tokens)
        return ids, truncated


def find_tokenizer(checkpoint: Path, explicit: Path | None) -> Path:
    """Where the judge's vocabulary is: --clip-tokenizer, else beside the checkpoint, else the copy inside
    an installed open_clip_torch (found without importing it: its import needs torchvision)."""
    if explicit is not None:
        if not explicit.exists():
            raise ValueError(f"CLIP tokenizer {explicit} does not exist")
        return explicit
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if (folder / OPEN_CLIP_VOCAB).is_file():
        return folder / OPEN_CLIP_VOCAB
    if any((folder / name).is_file() for name in _HF_FILES):
        return folder
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / OPEN_CLIP_VOCAB
        if bundled.is_file():
            return bundled
    raise ValueError(f"no CLIP tokenizer found beside {checkpoint}; pass --clip-tokenizer with open_clip's "
                     f"{OPEN_CLIP_VOCAB} or a Hugging Face CLIP tokenizer folder (tokenizer.json)")
