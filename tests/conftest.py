"""Shared fixtures: tiny images and the helpers in checkpoints.py."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A random RGB image (never constant: constant images hide preprocessing bugs)."""
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
