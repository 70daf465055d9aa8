"""A synthetic LLaVA training set: noise images and conversations in the original LLaVA JSON format
({"id", "image", "conversations": [{"from": "human", ...}, {"from": "gpt", ...}]}), answers of mixed length."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

WORDS = ["the", "image", "shows", "a", "small", "red", "house", "near", "green", "trees", "under", "a", "cloudy",
         "sky", "with", "two", "people", "walking", "along", "a", "stone", "path", "while", "birds", "fly", "over",
         "the", "quiet", "river", "and", "distant", "hills"]
QUESTIONS = ("What is in the image?", "Describe the picture in detail.", "What colors do you see?",
             "Is there anything unusual here?", "Write a short caption for this photo.")


def make_dataset(directory: Path, n: int, seed: int) -> Path:
    """`n` noise images of mixed sizes and a LLaVA JSON file (original format) whose answers run from a
    few words to ~100; returns the JSON path. Rebuilt every run: it takes well under a second."""
    import numpy as np
    from PIL import Image

    shutil.rmtree(directory, ignore_errors=True)
    (directory / "images").mkdir(parents=True)
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    rows = []
    for i in range(n):
        h, w = rng.randint(80, 200), rng.randint(80, 200)
        Image.fromarray(np_rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(directory / "images" / f"{i}.png")
        answer = " ".join(rng.choices(WORDS, k=rng.choice((3, 8, 20, 40, 70, 100)))).capitalize() + "."
        rows.append({"id": f"synthetic-{i}", "image": f"{i}.png",
                     "conversations": [{"from": "human", "value": "<image>\n" + rng.choice(QUESTIONS)},
                                       {"from": "gpt", "value": answer}]})
    path = directory / "data.json"
    path.write_text(json.dumps(rows, indent=1))
    return path
