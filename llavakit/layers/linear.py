"""The one factory every model Linear is built through.

Each layer records how it would be split across tensor-parallel ranks (`tp_style`): "column" splits
the output features, "row" the input features, "replicated" keeps it whole. Transforms such as
tensor parallelism and weight-only quantization find layers by this tag and replace them, so model
code never changes for them.
"""

from torch import nn

TP_STYLES = ("column", "row", "replicated")


class Linear(nn.Linear):
    """nn.Linear tagged with its tensor-parallel style."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp_style: str):
        assert tp_style in TP_STYLES, tp_style
        super().__init__(in_features, out_features, bias=bias)
        self.tp_style = tp_style


def linear(in_features: int, out_features: int, bias: bool = False, tp_style: str = "replicated") -> Linear:
    """Build a Linear layer; see the module docstring for `tp_style`."""
    return Linear(in_features, out_features, bias, tp_style)
