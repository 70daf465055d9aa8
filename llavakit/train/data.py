"""Training data: LLaVA / PaddleMIX JSON records -> token ids, labels and preprocessed images (SPEC §6).

Input ids are built with the same chunk rule as inference (`PromptProcessor.tokenize`), and labels come
from the character offsets of those very tokens, so labels and ids cannot disagree (the original's
"tokenization mismatch"). A bad row or image never stops training: the dataset returns `Skipped`.
"""

from __future__ import annotations

import hashlib
import os
import random
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch

from llavakit.config import IGNORE_INDEX
from llavakit.datafiles import DataFileError, Record, json_kind, read_json_or_jsonl
from llavakit.processing.conversation import Template, add_image_tags, render_segments
from llavakit.processing.image import ImageError
from llavakit.processing.media import FetchPolicy, MediaError, is_url, read_source
from llavakit.processing.prompt import IMAGE_TAG, PreparedImage, PromptProcessor

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_LENGTH_ESTIMATE = 128
DATA_FORMAT = ("LLaVA training data (data_path / --data-path): a JSON array of records, or one record per line in "
               "a file named .jsonl")


class BadSample(ValueError):
    """A training row that cannot be used; the message names the row and the problem."""


@dataclass(slots=True)
class Sample:
    """One conversation: id, image source(s) (None for text-only) and {"role", "content"} messages."""

    id: str
    image: str | list[str] | None
    messages: list[dict[str, str]]


@dataclass(slots=True)
class Skipped:
    """A dataset item that was left out, and why."""

    index: int
    reason: str


def _parse_image(value: Any, where: str) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise BadSample(f"{where}: 'image' must be a path/URL string or a list of them, got {value!r:.80}")


def _parse_turn(turn: Any, where: str, k: int) -> list[dict[str, str]]:
    """One entry of "conversations": a {"from", "value"} dict, or a PaddleMIX [user, assistant] pair."""
    if isinstance(turn, (list, tuple)):
        if len(turn) != 2:
            raise BadSample(f"{where}: conversation pair {k} has {len(turn)} items, expected [user, assistant]")
        return [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    if not isinstance(turn, dict) or "value" not in turn:
        raise BadSample(f"{where}: turn {k} is not a {{'from', 'value'}} object: {turn!r:.80}")
    name = turn.get("from", turn.get("role"))
    if str(name).lower() not in ROLES:
        raise BadSample(f"{where}: turn {k} has unknown role {name!r}; expected one of {sorted(ROLES)}")
    return [{"role": ROLES[str(name).lower()], "content": turn["value"]}]


def _check_messages(messages: list[dict[str, Any]], where: str) -> None:
    start = int(bool(messages) and messages[0]["role"] == "system")
    for k, message in enumerate(messages):
        if not isinstance(message["content"], str):
            raise BadSample(f"{where}: turn {k} value is {type(message['content']).__name__}, not a string")
        expected = "system" if k < start else ("user", "assistant")[(k - start) % 2]
        if message["role"] != expected:
            raise BadSample(f"{where}: turn {k} is {message['role']!r} where {expected!r} was expected; "
                            "turns must alternate user, assistant after an optional leading system turn")
        if expected == "assistant" and not message["content"].strip():
            raise BadSample(f"{where}: assistant turn {k} is empty; there is nothing to learn from it")
    if len(messages) == start or messages[-1]["role"] != "assistant":
        raise BadSample(f"{where}: the conversation must end with an assistant answer")


def parse_record(row: dict, index: int) -> Sample:
    """A Sample from an original-LLaVA row ({"id", "image"?, "conversations": [{"from", "value"}]}) or a
    PaddleMIX row ({"image"?, "conversations": [[user, assistant], ...]}). Raises BadSample."""
    if not isinstance(row, dict):
        raise BadSample(f"row {index}: expected a JSON object, got {type(row).__name__}")
    sample_id = str(row.get("id", index))
    place = row.where if isinstance(row, Record) else f"row {index}"  # a Record knows its file: "data.jsonl:7"
    where = f"{place} (id {sample_id!r})"
    conversations = row.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise BadSample(f"{where}: no conversations (expected a non-empty 'conversations' list)")
    messages = [m for k, turn in enumerate(conversations) for m in _parse_turn(turn, where, k)]
    _check_messages(messages, where)
    return Sample(sample_id, _parse_image(row.get("image"), where), messages)


def load_records(path: str | Path) -> list[dict]:
    """Rows of a JSON array file, or of a JSON-lines file (.jsonl: one object per line), as datafiles Records
    (which know their file and line or item, for the messages about them)."""
    rows = read_json_or_jsonl(path, DATA_FORMAT)
    if not isinstance(rows, list):
        raise DataFileError(f"{path} holds a JSON {json_kind(rows)}; expected {DATA_FORMAT}")
    return rows


def image_path(source: str, image_folder: Path | None) -> Path:
    """Where a row's local image is read: under `image_folder` (an absolute path stays as it is), else as given."""
    return image_folder / source if image_folder is not None else Path(source)


def image_folder_hint(image_folder: Path | None) -> str:
    """Where relative image paths were looked for, in words for an error message."""
    if image_folder is None:
        return (f"no image_folder (--image-folder) is set, so relative paths are read from the current directory "
                f"{Path.cwd()}; pass --image-folder DIR")
    return f"relative paths are read under image_folder (--image-folder) {image_folder}"


def _local_sources(row: Any) -> list[str]:
    """The image paths a raw row names that are files, not URLs (nothing for malformed rows)."""
    image = row.get("image") if isinstance(row, dict) else None
    sources = [image] if isinstance(image, str) else image if isinstance(image, list) else []
    return [s for s in sources if isinstance(s, str) and s and not is_url(s)]


def missing_image_files(records: list, image_folder: Path | None) -> list[tuple[int, Path]]:
    """(row index, path) of every local image file the rows name that does not exist: a stat per image, so
    a wrong or missing image folder shows before any model is loaded."""
    return [(i, path) for i, row in enumerate(records) for source in _local_sources(row)
            if not (path := image_path(source, image_folder)).is_file()]


def _truncate(ids: list[int], labels: list[int], runs: list[tuple[int, int]], max_length: int,
              wrap: tuple[int, int] | None) -> tuple[list[int], list[int], int]:
    """Cut to max_length, never through an image: an image whose placeholders (with `wrap`, also its
    <im_start> and <im_end>) do not all fit is dropped with everything after it."""
    cut, kept = min(len(ids), max_length), len(runs)
    for k, (start, end) in enumerate(runs):
        if wrap is not None:
            start -= int(start > 0 and ids[start - 1] == wrap[0])
            end += int(end < len(ids) and ids[end] == wrap[1])
        if cut < end:
            cut, kept = min(cut, start), k
            break
    return ids[:cut], labels[:cut], kept


def _segments(processor: PromptProcessor, sample: Sample, template: Template,
              num_images: int) -> list[tuple[str, bool]]:
    try:
        segments = render_segments(template, add_image_tags(sample.messages, num_images, IMAGE_TAG),
                                   add_generation_prompt=False)
    except ValueError as e:
        raise BadSample(f"sample {sample.id!r}: {e}") from None
    if processor.cfg.use_im_start_end:  # as PromptProcessor.tokenize; a tag never spans two segments
        segments = [(t.replace(IMAGE_TAG, f"<im_start>{IMAGE_TAG}<im_end>"), f) for t, f in segments]
    return segments


def _encode(tokenizer: Any, segments: list[tuple[str, bool]], images: list[PreparedImage],
            image_id: int) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """ids, labels and each image's placeholder run [start, end), by tokenize_texts' rule: every
    chunk between tags encoded alone, later chunks without their BOS; offsets shifted to the full text."""
    starts = list(accumulate((len(t) for t, _ in segments), initial=0))  # segment k: [starts[k], starts[k + 1])
    chunks = "".join(t for t, _ in segments).split(IMAGE_TAG)
    encodings = [tokenizer(c, add_special_tokens=True, return_offsets_mapping=True) for c in chunks]
    bos = tokenizer.bos_token_id
    strip = int(bos is not None and encodings[0].input_ids[:1] == [bos])
    ids, labels, runs, base = [], [], [], 0
    for k, (chunk, enc) in enumerate(zip(chunks, encodings, strict=True)):
        if k > 0:
            n = images[k - 1].num_tokens
            runs.append((len(ids), len(ids) + n))
            ids, labels = ids + [image_id] * n, labels + [IGNORE_INDEX] * n
            assert enc.input_ids[:strip] == [bos] * strip, "the tokenizer adds BOS to every encode"
        skip = strip if k > 0 else 0
        for token, (start, _) in zip(enc.input_ids[skip:], enc.offset_mapping[skip:], strict=True):
            ids.append(token)
            learned = segments[bisect_right(starts, base + start) - 1][1]
            labels.append(token if learned else IGNORE_INDEX)
        base += len(chunk) + len(IMAGE_TAG)
    return ids, labels, runs


def tokenize_sample(processor: PromptProcessor, sample: Sample, template: Template,
                    images: list[PreparedImage], max_length: int) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, kept_images) for one sample.

    input_ids == processor.tokenize(render(template, add_image_tags(messages)), images), built by the
    same chunk rule. Label rule: a token is learned (label = its id) iff the first character of its span
    lies in a learned segment of `render_segments` (an assistant answer with the separator/EOS ending
    it); every other token, image placeholders included, is IGNORE_INDEX.
    """
    segments = _segments(processor, sample, template, len(images))
    tags = sum(t.count(IMAGE_TAG) for t, _ in segments)
    if tags != len(images):
        raise BadSample(f"sample {sample.id!r} has {tags} {IMAGE_TAG} tags but {len(images)} images")
    ids, labels, runs = _encode(processor.tokenizer, segments, images, processor.cfg.image_token_id)
    im_ids = processor.tokenizer.convert_tokens_to_ids(["<im_start>", "<im_end>"])
    wrap = tuple(im_ids) if processor.cfg.use_im_start_end else None
    ids, labels, kept = _truncate(ids, labels, runs, max_length, wrap)
    if all(label == IGNORE_INDEX for label in labels):
        raise BadSample(f"sample {sample.id!r}: no answer tokens within model_max_length {max_length} "
                        "(the prompt and images fill it); raise max_length or shorten the sample")
    return ids, labels, kept


class LlavaDataset(torch.utils.data.Dataset):
    """Records -> {"input_ids", "labels", "pixel_values", "image_sizes", "index"} or Skipped.

    Image sources are paths relative to `image_folder`, absolute paths, or URLs. URLs go through the
    guarded fetcher under `policy` and are cached in `image_cache_dir` (named by the URL's sha256).
    """

    def __init__(self, records: list[dict], processor: PromptProcessor, template: Template,
                 image_folder: Path | None, max_length: int, image_cache_dir: Path | None = None,
                 policy: FetchPolicy | None = None):
        if not getattr(processor.tokenizer, "is_fast", False):
            raise ValueError("training needs a fast tokenizer (tokenizer.json) for token offsets; "
                             "save the checkpoint's tokenizer with tokenizer.json")
        self.records, self.processor, self.template = records, processor, template
        self.max_length, self.policy = max_length, policy
        self.image_folder = None if image_folder is None else Path(image_folder)
        self.image_cache_dir = None if image_cache_dir is None else Path(image_cache_dir)
        self.pad_id = processor.tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.records)

    def modality(self, i: int) -> str:
        """"image" if the row names an image, else "text" (read from the raw row, no parsing)."""
        return "image" if isinstance(self.records[i], dict) and self.records[i].get("image") else "text"

    def length(self, i: int) -> int:
        """Cheap length estimate for grouping: words of every string in the conversation plus a flat
        IMAGE_LENGTH_ESTIMATE per image (the original's estimate)."""
        row = self.records[i] if isinstance(self.records[i], dict) else {}
        words = sum(len(s.split()) for s in _strings(row.get("conversations")))
        image = row.get("image")
        num_images = len(image) if isinstance(image, list) else int(bool(image))
        return words + IMAGE_LENGTH_ESTIMATE * num_images

    def __getitem__(self, i: int) -> dict[str, Any] | Skipped:
        try:
            sample = parse_record(self.records[i], i)
            sources = [sample.image] if isinstance(sample.image, str) else sample.image or []
            images = [self._prepare(source) for source in sources]
            ids, labels, kept = tokenize_sample(self.processor, sample, self.template, images, self.max_length)
        except (BadSample, ImageError, MediaError, OSError) as e:
            return Skipped(i, str(e))  # each message names the row or image and the problem
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
                "pixel_values": [im.pixel_values for im in images[:kept]],
                "image_sizes": [im.size for im in images[:kept]], "index": i}

    def collate(self, batch: list[dict[str, Any] | Skipped]) -> dict[str, Any]:
        """`collate` with this tokenizer's pad id (usable as a DataLoader's collate_fn)."""
        return collate(batch, self.pad_id)

    def _prepare(self, source: str) -> PreparedImage:
        try:
            return self.processor.prepare_images([self._read(source)])[0]
        except (ImageError, MediaError) as e:
            raise type(e)(f"image {source!r}: {e}") from None

    def _read(self, source: str) -> bytes:
        if is_url(source):
            return self._fetch(source)
        path = image_path(source, self.image_folder)
        if not path.is_file():
            raise MediaError(f"not found at {path.absolute()}; {image_folder_hint(self.image_folder)}")
        return path.read_bytes()

    def _fetch(self, url: str) -> bytes:
        """A URL through the guarded fetcher; http(s) ones cached on disk when a cache dir is set."""
        if self.image_cache_dir is None or url[:5].lower() == "data:":
            return read_source(url, self.policy)
        cached = self.image_cache_dir / hashlib.sha256(url.encode()).hexdigest()
        if cached.is_file():
            return cached.read_bytes()
        data = read_source(url, self.policy)
        self.image_cache_dir.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a DataLoader worker reading concurrently never sees a partial file.
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, cached)
        return data


def _strings(value: Any) -> list[str]:
    """Every string inside nested lists/dicts (the "value"s of either conversation format)."""
    if isinstance(value, dict):
        value = value.get("value")
    if isinstance(value, str):
        return [value]
    return [s for v in value for s in _strings(v)] if isinstance(value, (list, tuple)) else []


def collate(batch: list[dict[str, Any] | Skipped], pad_id: int = 0) -> dict[str, Any]:
    """Stack dataset items into a right-padded batch; Skipped items are dropped and reported.

    Returns input_ids and labels (B, T), pixel_values (list, images in sample order), image_sizes,
    indices, num_tokens (supervised tokens) and skipped. Right padding needs no attention mask for our
    causal model: each real token attends only to earlier positions, so pads after it are never seen,
    its position ids are the same as unpadded, and the pads' own outputs carry label -100 (no loss).
    """
    items = [b for b in batch if not isinstance(b, Skipped)]
    length = max((len(b["input_ids"]) for b in items), default=0)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, item in enumerate(items):
        input_ids[row, :len(item["input_ids"])] = item["input_ids"]
        labels[row, :len(item["labels"])] = item["labels"]
    return {"input_ids": input_ids, "labels": labels,
            "pixel_values": [p for item in items for p in item["pixel_values"]],
            "image_sizes": [s for item in items for s in item["image_sizes"]],
            "indices": [item["index"] for item in items], "num_tokens": int((labels != IGNORE_INDEX).sum()),
            "skipped": [b for b in batch if isinstance(b, Skipped)]}


class ModalityGroupedBatches:
    """Deterministic global batches of dataset indices for one epoch. With `group_by_modality`, each
    batch holds one modality only (image or text), which trains faster (SPEC §6); batches are shuffled."""

    def __init__(self, dataset_len: int, modality: list[str], batch_size: int, seed: int,
                 group_by_modality: bool, drop_last: bool = False):
        if len(modality) != dataset_len or batch_size <= 0:
            raise ValueError(f"need one modality per item and a positive batch size; got {len(modality)} "
                             f"modalities for {dataset_len} items, batch_size {batch_size}")
        self.dataset_len, self.modality, self.batch_size = dataset_len, modality, batch_size
        self.seed, self.group_by_modality, self.drop_last = seed, group_by_modality, drop_last

    def _cut(self, indices: list[int]) -> list[list[int]]:
        batches = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        return [b for b in batches if len(b) == self.batch_size] if self.drop_last else batches

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of `epoch`; the same (seed, epoch) always gives the same batches."""
        rng = random.Random(f"{self.seed}:{epoch}")
        batches = []
        for kind in sorted(set(self.modality)) if self.group_by_modality else [None]:
            group = [i for i, m in enumerate(self.modality) if kind is None or m == kind]
            rng.shuffle(group)
            batches += self._cut(group)
        if self.group_by_modality:
            rng.shuffle(batches)
        return batches
