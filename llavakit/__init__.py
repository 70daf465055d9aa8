"""llavakit: LLaVA-family vision-language models — load, chat, serve, train, evaluate."""

from llavakit.generation import GenerationOutput
from llavakit.pipeline import Pipeline, load
from llavakit.sampling import SamplingParams

__all__ = ["load", "Pipeline", "GenerationOutput", "SamplingParams"]
__version__ = "0.1.0"
