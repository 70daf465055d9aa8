"""Shared fixtures: tiny images and the helpers in checkpoints.py."""

import os
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


@pytest.fixture
def interpreted_triton():
    """Triton's CPU interpreter; it must be chosen before triton is imported, so these tests run only in
    a session started with TRITON_INTERPRET=1 and triton installed (CI has neither: CPU torch has no triton)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("set TRITON_INTERPRET=1 (and install triton) to run the Triton kernel on the CPU")
    pytest.importorskip("triton")
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch(tensor, scope):  # triton 3.6's interpreter calls int() on a 1-element array (a runtime loop
        original(tensor, scope)  # bound), which numpy >= 2.4 refuses; read the element instead
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch
    yield
    interpreter._patch_lang_tensor = original
