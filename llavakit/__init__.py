"""llavakit: LLaVA-family vision-language models — load, chat, serve, train, evaluate."""

from llavakit.generation import GenerationOutput
from llavakit.pipeline import Pipeline, load
from llavakit.sampling import SamplingParams


def __getattr__(name: str):
    if name == "LLM":  # the engine is imported only when asked for
        from llavakit.engine.llm_engine import LLM

        return LLM
    raise AttributeError(f"module 'llavakit' has no attribute {name!r}")


__all__ = ["load", "LLM", "Pipeline", "GenerationOutput", "SamplingParams"]
__version__ = "0.1.0"
