"""Checkpoint files -> named tensors, read lazily from memory-mapped files.

Formats: model.safetensors, safetensors shards + index, and legacy pytorch_model*.bin, which are only
ever read with `weights_only=True` (a pickle that holds anything but tensors is refused).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

TensorGetter = Callable[[], torch.Tensor]


class WeightsError(ValueError):
    """A checkpoint's weight files are missing, unreadable or do not fit the model."""


def find_weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, preferring safetensors over .bin."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.is_file():
            return _files_from_index(index)
        if (directory / single).is_file():
            return [directory / single]
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(directory.glob(pattern))
        if files:
            return files
    raise WeightsError(f"no weights found in {directory}: expected model.safetensors, safetensors shards with "
                       "model.safetensors.index.json, or pytorch_model*.bin")


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightsError(f"{index} is not a valid shard index ({e}); re-download it") from None
    files = sorted({index.parent / name for name in weight_map.values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise WeightsError(f"{index.name} lists shards that are not in {index.parent}: {', '.join(missing)}; "
                           "the download is incomplete")
    return files


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, TensorGetter]]:
    """(name, getter) for every tensor; a getter reads its tensor only when called."""
    for f in files:
        if f.suffix == ".safetensors":
            yield from _iter_safetensors(f)
        else:
            yield from _iter_bin(f)


def _iter_safetensors(path: Path) -> Iterator[tuple[str, TensorGetter]]:
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        names = list(handle.keys())
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({e}); it is corrupt or truncated, "
                           "re-download it") from None
    for name in names:
        yield name, (lambda n=name: _read_safetensor(handle, path, n))


def _read_safetensor(handle, path: Path, name: str) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"cannot read tensor {name} from {path} ({e}); "
                           "the file is corrupt, re-download it") from None


def _iter_bin(path: Path) -> Iterator[tuple[str, TensorGetter]]:
    state = load_bin(path)
    for name, tensor in state.items():
        yield name, (lambda t=tensor: t)


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A legacy PyTorch checkpoint, safely: tensors only, memory-mapped when the format allows."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # old (non-zip) serialization cannot be mapped; read it whole
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(f"refusing to load {path}: it holds more than tensors (arbitrary pickled objects), "
                           "which could run code. Convert it to safetensors with a trusted tool first") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint ({e}); re-download it") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a state dict of tensors; llavakit loads only plain weight files")
    return state
