"""llavakit: LLaVA-family vision-language models — load, chat, serve, train, evaluate.

The public names are imported on first use, so that pure-Python parts (the engine's scheduler, the
processing of prompts) can be imported without torch.
"""

from llavakit.sampling import SamplingParams

_LAZY = {"load": "llavakit.pipeline", "Pipeline": "llavakit.pipeline", "GenerationOutput": "llavakit.generation",
         "LLM": "llavakit.llm"}

__all__ = ["load", "LLM", "Pipeline", "GenerationOutput", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llavakit' has no attribute {name!r}")
