"""Model names -> local checkpoint directories: a directory as is, a hub id through huggingface_hub
(its cache, HF_HOME and HF_HUB_OFFLINE apply)."""

from __future__ import annotations

import re
from pathlib import Path

from llavakit.weights.files import WeightsError

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def resolve_model_dir(name: str | Path | None, revision: str | None = None) -> Path:
    """A local directory holding the checkpoint `name` (a path or a hub id such as org/model)."""
    name = resolve_alias(name)
    path = Path(name)
    if path.is_dir():
        return path
    if not _REPO_ID.match(str(name)):
        raise WeightsError(f"model {str(name)!r} is not a directory and not a hub id (org/name); "
                           "pass a checkpoint directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name), revision=revision, allow_patterns=_PATTERNS))
    except Exception as e:  # network down, offline and not cached, unknown repo, gated repo...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"model {name!r} is not a local directory and could not be fetched from the hub "
                           f"({reason}); download it where the network allows "
                           f"(hf download {name}) or pass a local directory") from None


# Short names for the checkpoints the LLaVA world uses most (llava-hf layout on the hub).
ALIASES = {
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
    "llava-v1.6-vicuna-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-v1.6-vicuna-13b": "llava-hf/llava-v1.6-vicuna-13b-hf",
    "llava-v1.6-mistral-7b": "llava-hf/llava-v1.6-mistral-7b-hf",
    "llava-v1.6-34b": "llava-hf/llava-v1.6-34b-hf",
    "llava-next-video-7b": "llava-hf/LLaVA-NeXT-Video-7B-hf",
    "llava-next-video-34b": "llava-hf/LLaVA-NeXT-Video-34B-hf",
}
for _short in list(ALIASES):  # llava-v1.5-7b and llava-1.6-vicuna-7b spell the same models
    ALIASES[_short.replace("llava-1.5", "llava-v1.5").replace("llava-v1.6", "llava-1.6")] = ALIASES[_short]


DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo" / "model"


def resolve_alias(name: str | Path | None) -> str | Path:
    """The hub id an alias stands for ("demo" or None: the built-in demo model); anything else
    unchanged. A local directory always wins."""
    if name is not None and Path(name).is_dir():
        return name
    if name is None or str(name) == "demo":
        if not (DEMO_MODEL / "config.json").is_file():
            raise WeightsError("the built-in demo model is not installed in this copy of llavakit; build it with "
                               "`llavakit demo train --install` or pass --model")
        return DEMO_MODEL
    return ALIASES.get(str(name).lower(), name)
