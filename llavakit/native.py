"""C kernels compiled on first use: the system C compiler builds a source file shipped in the package into the
user's cache (once per source and flags), and ctypes loads it. Callers fall back to PyTorch when this returns None.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

AVX2 = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC"]  # the kernels' common compile flags (x86, AVX2 + FMA)


def compile_library(source: Path, compile_flags: list[str], link_flags: list[str]) -> ctypes.CDLL | None:
    """`source` compiled and linked with the system C compiler into the user's cache (once per source and
    flags) and loaded; None where that cannot happen (no compiler, a failed build, an unwritable cache)."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or not source.is_file():
        return None
    flags = " ".join(compile_flags) + " | " + " ".join(link_flags)
    tag = hashlib.sha256(source.read_bytes() + flags.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llavakit" / "kernels"
    path = cache / f"{source.stem}_{tag}.so"
    try:
        if not path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:  # build aside, then rename: safe across processes
                obj, built = Path(tmp) / f"{source.stem}.o", Path(tmp) / path.name
                for cmd in ([compiler, *compile_flags, "-c", str(source), "-o", str(obj)],
                            [compiler, str(obj), "-o", str(built), *link_flags]):
                    if subprocess.run(cmd, capture_output=True).returncode != 0:
                        return None
                os.replace(built, path)
        return ctypes.CDLL(str(path))
    except OSError:  # a cache directory we may not write, a library the loader refuses: the caller falls back
        return None


def load_kernels(source: Path, switch: str, signatures: dict[str, list], extra_compile: tuple[str, ...] = (),
                 link_flags: tuple[str, ...] = ("-shared", "-fopenmp")) -> ctypes.CDLL | None:
    """An AVX2 kernel library with its functions' argument types set (they return nothing), or None where it
    cannot run: the environment variable `switch` set to 0, a CPU without AVX2, no C compiler, a failed build."""
    if os.environ.get(switch, "1") == "0" or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    lib = compile_library(source, [*AVX2, *extra_compile], list(link_flags))
    if lib is not None:
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, None
    return lib
