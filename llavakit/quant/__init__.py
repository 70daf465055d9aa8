"""Weight-only int8/int4 quantization of the language model: a transform on a built model (`quantize`)."""

from llavakit.quant.config import METHODS, QuantConfig
from llavakit.quant.quantize import quantize, quantize_skeleton

__all__ = ["METHODS", "QuantConfig", "quantize", "quantize_skeleton"]
