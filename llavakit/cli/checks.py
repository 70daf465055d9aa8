"""Checks the subcommands make before a model loads, so that a typo fails in a second instead of after a
load of minutes: input images and videos, and output paths (runtime errors, exit 1). Flag values are checked
by their argparse types (`common.number`: a bad one is a usage error, exit 2)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from llavakit.cli.common import CliError
from llavakit.processing.media import is_url

REMOTE = ("http://", "https://")


def check_images(sources: Iterable[str], flag: str = "--image") -> None:
    """Read and decode every local image (a path or a data: URL) now, before the model loads; http(s) URLs
    are left to the fetch that uses them. Errors name the image (and the flag when the file is missing)."""
    from llavakit.processing.image import load_image

    for source in map(str, sources):
        if source[:8].lower().startswith(REMOTE):
            continue
        _check_file(source, flag)
        load_image(source)


def check_videos(sources: Iterable[str], flag: str = "--video") -> None:
    """Every local video file exists (decoding waits: it costs far more than an image)."""
    for source in map(str, sources):
        _check_file(source, flag)


def _check_file(source: str, flag: str) -> None:
    """A source that is not a URL names a file that exists."""
    if not is_url(source) and not Path(source).expanduser().is_file():
        raise CliError(f"{flag} {source}: no such file; check the path")


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
