"""CLIP score of generated captions: how well each caption matches its image, by an open_clip judge.

CLIP score = 100 * max(cos(image embedding, text embedding), 0) (Hessel et al. 2021 without their 2.5
weight, as torchmetrics computes it); a file's score is the mean over its scored items.

Inputs: a `llavakit predict` answers file (JSONL: question_id, text, optional image), or MindIE's
precision-test JSON {image file: caption} (its gpu_coco_predict.json / image_info.json). The image of an
answer is its own "image" field, else the "image" of the same question_id in the question file.
An item whose image is missing or unreadable is skipped and counted, never fatal; nothing to score is.
Per-item scores are written as JSONL rows {question_id, image, text, clip_score, truncated}.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llavakit import datafiles
from llavakit.eval.clip_judge import ClipJudge
from llavakit.processing.image import load_image


@dataclass(slots=True)
class Caption:
    """One caption to judge; `question_id` and `image` as written in the files (the image relative to the
    image folder). Files are matched on str(question_id), so 7 and "7" are one question."""

    question_id: str | int
    text: str
    image: str | None = None


@dataclass(slots=True)
class Item:
    """A caption with the image file it describes."""

    question_id: str | int
    text: str
    image: str
    path: Path


CAPTIONS_FORMAT = ("llavakit predict's answers (JSONL {\"question_id\", \"text\", optional \"image\"}) or a "
                   "JSON object {image: caption}")
QUESTIONS_FORMAT = "a question file: JSONL (or a JSON list) of {\"question_id\", \"image\", ...} rows"


def _load_json_or_jsonl(path: Path, expected: str):
    """A .json file as one document, anything else as JSON lines; errors name the file, line and format."""
    text = datafiles.read_text(path, expected)
    if path.suffix == ".json":
        return datafiles.parse_json(text, str(path), expected)
    return datafiles.parse_jsonl(text, str(path), expected)


def read_captions(path: str | Path) -> list[Caption]:
    """The captions of an answers JSONL or of a MindIE {image: caption} JSON; a repeated id keeps its last."""
    path = Path(path)
    data = _load_json_or_jsonl(path, CAPTIONS_FORMAT)
    if isinstance(data, dict):
        return [Caption(image, str(text), image) for image, text in data.items()]
    captions: dict[str, Caption] = {}
    for i, row in enumerate(data):
        if not isinstance(row, dict) or "question_id" not in row or not isinstance(row.get("text"), str):
            raise ValueError(f"{path}: row {i + 1} needs 'question_id' and a 'text' string (llavakit predict's "
                             "answers format) or the file must be a JSON object {image: caption}")
        image = row.get("image")
        captions[str(row["question_id"])] = Caption(row["question_id"], row["text"], image and str(image))
    return list(captions.values())


def read_image_map(path: str | Path) -> dict[str, str]:
    """{question_id: image} from a question file (model_vqa JSONL, or a JSON list of such rows)."""
    rows = _load_json_or_jsonl(Path(path), QUESTIONS_FORMAT)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: a question file is JSONL or a JSON list of {{question_id, image, ...}} rows")  # noqa: TRY004
    return {str(r["question_id"]): str(r["image"]) for r in rows
            if isinstance(r, dict) and "question_id" in r and r.get("image")}


def attach_images(captions: list[Caption], image_map: dict[str, str] | None,
                  image_dir: Path) -> tuple[list[Item], list[str]]:
    """Captions with an existing image file, and one message per caption without."""
    items, skipped = [], []
    for c in captions:
        image = c.image or (image_map or {}).get(str(c.question_id))
        if image is None:
            why = "its id is not in the question file" if image_map is not None else "pass --questions"
            skipped.append(f"question {c.question_id}: no image (the row has no 'image' field; {why})")
            continue
        path = image_dir / image
        if not path.is_file():
            skipped.append(f"question {c.question_id}: image {path} not found")
            continue
        items.append(Item(c.question_id, c.text, image, path))
    return items, skipped


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """100 * max(cos, 0) per row of two (N, D) L2-normalised embedding matrices."""
    return 100 * (image_emb * text_emb).sum(dim=-1).clamp(min=0)


def _chunks(seq: list, size: int):
    for start in range(0, len(seq), size):
        yield seq[start:start + size]


def _embed_images(judge: ClipJudge, paths: list[Path], batch_size: int, bar, embeddings: dict) -> dict:
    """Add {path: embedding} for the readable images to `embeddings`; return {path: reason} for the others."""
    bad = {}
    for chunk in _chunks(paths, batch_size):
        images = {}
        for p in chunk:
            try:
                images[p] = load_image(p.read_bytes())  # bytes: a local file, never a URL to fetch
            except (ValueError, OSError) as e:
                bad[p] = str(e).splitlines()[0]
        if images:
            embeddings.update(zip(images, judge.embed_images(list(images.values())), strict=True))
        bar.update(len(chunk))
    return bad


def score_items(judge: ClipJudge, items: list[Item], batch_size: int = 32, progress: bool = True,
                image_cache: dict[Path, torch.Tensor] | None = None) -> tuple[list[dict], list[str]]:
    """Per-item rows {question_id, image, text, clip_score, truncated}, and a message per skipped item.
    Each distinct image is embedded once, however many captions describe it; pass the same `image_cache`
    to reuse the embeddings across files (compare's two caption sets of the same images)."""
    image_emb = {} if image_cache is None else image_cache
    paths = [p for p in dict.fromkeys(it.path for it in items) if p not in image_emb]
    with tqdm(total=len(paths) + len(items), desc="clip-score", unit="item", disable=None if progress else True) as bar:
        bad = _embed_images(judge, paths, batch_size, bar, image_emb)
        rows = []
        for chunk in _chunks([it for it in items if it.path in image_emb], batch_size):
            text_emb, truncated = judge.embed_texts([it.text for it in chunk])
            scores = clip_score(torch.stack([image_emb[it.path] for it in chunk]), text_emb)
            rows += [{"question_id": it.question_id, "image": it.image, "text": it.text, "clip_score": float(s),
                      "truncated": t} for it, s, t in zip(chunk, scores, truncated, strict=True)]
            bar.update(len(chunk))
    skipped = [f"question {it.question_id}: image {it.path}: {bad[it.path]}" for it in items if it.path in bad]
    return rows, skipped


def summarize(rows: list[dict], skipped: int) -> dict:
    """The file-level numbers: mean CLIP score and how many items were scored, skipped and truncated."""
    scores = [r["clip_score"] for r in rows]
    return {"clip_score": statistics.fmean(scores), "n": len(scores), "skipped": skipped,
            "truncated": sum(r["truncated"] for r in rows), "min": min(scores),
            "median": statistics.median(scores), "max": max(scores)}


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """One JSON object per line, UTF-8, the parent folder created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def is_score_file(path: str | Path) -> bool:
    """Whether a JSONL file holds per-item CLIP scores (its first row has "clip_score")."""
    path = Path(path)
    if path.suffix == ".json" or not path.is_file():
        return False
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        return "clip_score" in json.loads(first) if first else False
    except json.JSONDecodeError:
        return False


def read_scores(path: str | Path) -> dict[str, dict]:
    """{question_id: row} of a per-item score file written by `llavakit eval clip-score --output`."""
    rows = datafiles.read_jsonl(path, "a per-item score file written by `llavakit eval clip-score --output`")
    for row in rows:
        if "question_id" not in row or not isinstance(row.get("clip_score"), (int, float)):
            raise ValueError(f"{row.where} needs 'question_id' and a numeric 'clip_score' (a per-item score file "
                             "written by `llavakit eval clip-score --output`)")
    return {str(r["question_id"]): r for r in rows}
