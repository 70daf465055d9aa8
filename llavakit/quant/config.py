"""The quantization config: which method, its group size, whether the LM head is quantized too."""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("w8a16", "w4a16")
BITS = {"w8a16": 8, "w4a16": 4}
DEFAULT_GROUP_SIZE = {"w8a16": None, "w4a16": 128}  # None: one scale per output channel


@dataclass(frozen=True, slots=True)
class QuantConfig:
    """Weight-only integer quantization, symmetric, round-to-nearest.

    w8a16: int8, one scale per output channel. w4a16: int4, one scale per `group_size` input features of each
    output channel (128 unless given; -1 means per output channel, as in GPTQ configs). After construction,
    `group_size` None means one scale per output channel. Activations stay in the model's float dtype."""

    method: str
    group_size: int | None = None
    lm_head: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.group_size is None:
            object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE[self.method])
        elif self.group_size == -1:
            object.__setattr__(self, "group_size", None)
        elif self.group_size <= 0 or self.group_size % 8:
            raise ValueError(f"quantization group size must be a positive multiple of 8, got {self.group_size}")

    @property
    def bits(self) -> int:
        return BITS[self.method]

    @classmethod
    def parse(cls, method: str | QuantConfig | None, group_size: int | None = None,
              lm_head: bool = False) -> QuantConfig | None:
        """A QuantConfig from a method name (or an existing config, returned as is); None stays None."""
        if method is None or isinstance(method, QuantConfig):
            return method
        return cls(method.lower(), group_size, lm_head)
