"""`mm_projector.bin`: the original LLaVA's hand-off from projector pretraining to finetuning.

A projector-only run writes the projector under the original names (`model.mm_projector.0.weight`, ...; a
`linear` projector has no index: `model.mm_projector.weight`), plus `model.embed_tokens.weight` when it added
`<im_start>`/`<im_end>` (whose embeddings train with it), as a pickled torch file; `--pretrain_mm_mlp_adapter`
reads such a file, the original's or llavakit's, into a model built from parts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

MM_PROJECTOR_FILE = "mm_projector.bin"
IM_START_END = ("<im_start>", "<im_end>")
_PREFIX = "model.mm_projector."
_EMBED = "model.embed_tokens.weight"


def _original_name(name: str, linear: bool) -> str:
    """llavakit `projector.0.weight` -> `model.mm_projector.0.weight` (`model.mm_projector.weight` if linear)."""
    rest = name.removeprefix("projector.")
    return _PREFIX + (rest.removeprefix("0.") if linear else rest)


def mm_projector_state(state: dict[str, torch.Tensor], linear: bool, with_embeddings: bool
                       ) -> dict[str, torch.Tensor]:
    """The tensors of mm_projector.bin from a full model state dict (llavakit names)."""
    out = {_original_name(n, linear): t for n, t in state.items() if n.startswith("projector.")}
    if with_embeddings:
        out[_EMBED] = state["language_model.embed_tokens.weight"]
    return out


def save_mm_projector(state: dict[str, torch.Tensor], path: Path) -> None:
    torch.save({k: v.detach().cpu().contiguous() for k, v in state.items()}, path)


def load_mm_projector(model: nn.Module, path: Path, im_token_ids: list[int]) -> None:
    """Copy the projector of an mm_projector.bin into `model` (built with the same mm_projector_type), and the
    embeddings of <im_start>/<im_end> (`im_token_ids`) when the model uses them; every shape is checked."""
    if not path.is_file():
        raise ValueError(f"pretrain_mm_mlp_adapter {path} does not exist; pass the mm_projector.bin a "
                         "projector-only run (--tune_mm_mlp_adapter True) wrote")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and zip errors have many types
        raise ValueError(f"pretrain_mm_mlp_adapter {path} is not a torch state dict: {e}") from None
    linear = model.cfg.projector_type == "linear"
    params = {_original_name(n, linear): p for n, p in model.named_parameters() if n.startswith("projector.")}
    found = {k.split("mm_projector.", 1)[-1]: v for k, v in saved.items() if "mm_projector." in k}
    wanted = {k.removeprefix(_PREFIX): p for k, p in params.items()}
    if set(found) != set(wanted) or any(found[k].shape != p.shape for k, p in wanted.items()):
        shapes = {k: tuple(v.shape) for k, v in found.items()}
        raise ValueError(f"{path} holds projector tensors {shapes}, but this {model.cfg.projector_type} projector "
                         f"needs {({k: tuple(p.shape) for k, p in wanted.items()})}; pass the same "
                         "--mm_projector_type and --mm_vision_select_layer as the run that wrote it")
    with torch.no_grad():
        for key, param in wanted.items():
            param.copy_(found[key])
        if im_token_ids:
            _copy_new_rows(model.language_model.embed_tokens.weight, saved, im_token_ids, path)


def _copy_new_rows(embed: torch.Tensor, saved: dict, ids: list[int], path: Path) -> None:
    """The rows of <im_start>/<im_end>: by id from a llavakit file (same vocabulary), else the original's rule
    (only the new rows saved, or the whole embedding with the new tokens last: its tokenizer has no <image>)."""
    rows = saved.get(_EMBED)
    if rows is None:
        raise ValueError(f"{path} has no {_EMBED}: it was written without mm_use_im_start_end, which this run "
                         "sets; pass the same --mm_use_im_start_end as the run that wrote it")
    if rows.shape[1:] != embed.shape[1:]:
        raise ValueError(f"{path}: {_EMBED} has shape {tuple(rows.shape)}, which does not fit this model's "
                         f"embedding {tuple(embed.shape)}")
    embed[ids] = (rows[ids] if rows.shape == embed.shape else rows[-len(ids):]).to(embed.dtype)
