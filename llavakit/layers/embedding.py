"""The embedding table every model builds through (the seam for a vocab-parallel split)."""

from torch import nn


class Embedding(nn.Embedding):
    """nn.Embedding that skips its random init on the meta device.

    Checkpoint loading builds models on the meta device; initializing a meta embedding with normal_
    goes through torch._refs and imports torch._dynamo (~0.7 s, ~70 MiB) for values that are about to
    be replaced anyway.
    """

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


def embedding(num_embeddings: int, dim: int) -> Embedding:
    return Embedding(num_embeddings, dim)
