"""Checks the subcommands make before a model loads, so that a typo fails in a second instead of after a
load of minutes: flag values (argparse types, so a bad one is a usage error, exit 2), input images and
videos, and output paths (runtime errors, exit 1)."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from llavakit.cli.common import CliError

REMOTE = ("http://", "https://")


def number(kind: type, minimum: float | None = None, maximum: float | None = None, *, above: float | None = None,
           below: float | None = None, note: str = "") -> Callable[[str], float]:
    """An argparse type: a `kind` (int or float) within [minimum, maximum] (`above` / `below`: strict bounds),
    else a usage error that states the range, e.g. "argument --top-p: must be in (0, 1], got 2"."""
    wanted = _range_text(minimum, maximum, above, below) + (f" ({note})" if note else "")

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'} "
                                             f"{wanted}, got {text!r}") from None
        ok = not (isinstance(value, float) and math.isnan(value))
        ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
        if not (ok and (above is None or value > above) and (below is None or value < below)):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _range_text(minimum, maximum, above, below) -> str:
    """">= 0", "> 0", "in (0, 1]", ... for the bounds given."""
    low = f"[{minimum:g}" if minimum is not None else f"({above:g}" if above is not None else None
    high = f"{maximum:g}]" if maximum is not None else f"{below:g})" if below is not None else None
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f"{'>=' if minimum is not None else '>'} {low[1:]}"
    return f"{'<=' if maximum is not None else '<'} {high[:-1]}"


def check_images(sources: Iterable[str], flag: str = "--image") -> None:
    """Read and decode every local image (a path or a data: URL) now, before the model loads; http(s) URLs
    are left to the fetch that uses them. Errors name the image (and the flag when the file is missing)."""
    from llavakit.processing.image import load_image

    for source in sources:
        text = str(source)
        if text[:8].lower().startswith(REMOTE):
            continue
        if "://" not in text and not text[:5].lower() == "data:" and not Path(text).expanduser().exists():
            raise CliError(f"{flag} {text}: no such file; check the path")
        load_image(text)


def check_videos(sources: Iterable[str], flag: str = "--video") -> None:
    """Every local video file exists (decoding waits: it costs far more than an image)."""
    for source in sources:
        text = str(source)
        if "://" not in text and not text[:5].lower() == "data:" and not Path(text).expanduser().is_file():
            raise CliError(f"{flag} {text}: no such file; check the path")


def check_output(path: Path, flag: str, makedirs: bool = False, directory: bool = False) -> None:
    """`path` can be written: a file (`directory`: a folder) in a folder that exists (with `makedirs`, the
    command creates it, so the nearest existing folder above it) and is writable."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        raise CliError(f"{flag} {path} is {'a file' if directory else 'a directory'}; pass a "
                       f"{'directory' if directory else 'file name'}")
    folder = path.absolute() if directory and path.is_dir() else path.absolute().parent
    if makedirs:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
    if not folder.is_dir():
        where = "is not a directory" if folder.exists() else "does not exist"
        raise CliError(f"{flag} {path}: the folder {folder} {where}; create it or pass another {flag}")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise CliError(f"{flag} {path}: {path if path.exists() else folder} is not writable; pass another {flag}")


def make_parent(path: Path, flag: str) -> None:
    """Create the folder `path` goes in (after check_output(..., makedirs=True)), or say why it cannot be."""
    folder = Path(path).absolute().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"{flag} {path}: its folder {folder} cannot be created ({e.strerror or e}); pass another "
                       f"{flag}") from None
