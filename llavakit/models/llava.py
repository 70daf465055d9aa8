"""The LLaVA composition: CLIP tower -> projector -> image and video features scattered into the decoder's
input.

Three explicit steps, used alike by the simple generate loop, the engine and training:
`encode_images` (tower, projector, AnyRes merge) and `encode_videos` (tower, 2-D pooling of every frame,
projector), both in prompt order through `encode_media` -> `embed_inputs` (masked scatter with a count
check) -> `forward` (decoder) -> `compute_logits`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llavakit.config import LlavaConfig
from llavakit.geometry import anyres_grid, unpad_shape
from llavakit.layers.attention import AttentionMetadata
from llavakit.layers.linear import linear
from llavakit.models.clip import CLIPVisionTower
from llavakit.models.llama import LlamaModel
from llavakit.models.projector import Projector


class LlavaForConditionalGeneration(nn.Module):
    """One class for LLaVA-1.5, LLaVA-NeXT (AnyRes), LLaVA-NeXT-Video and LLaVAR-style variants."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = CLIPVisionTower(cfg.vision, cfg.feature_layers)
        self.projector = Projector(cfg.mm_hidden_size, cfg.text.hidden_size, cfg.projector_depth, cfg.projector_bias)
        self.language_model = LlamaModel(cfg.text)
        self.lm_head = linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False, tp_style="column")
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        if cfg.patch_merge_type == "spatial_unpad":
            self.image_newline = nn.Parameter(torch.zeros(cfg.text.hidden_size))

    @property
    def device(self) -> torch.device:
        """Where the model runs (the embeddings' device: the LM head may be quantized, and have no `.weight`)."""
        return self.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (that of the embeddings, which quantization never changes)."""
        return self.language_model.embed_tokens.weight.dtype

    def encode_images(self, pixel_values: list[torch.Tensor], image_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Per image: pixel values (tiles, C, S, S) and original (height, width) -> features (tokens, D).

        All tiles of all images go through the tower in one batch.
        """
        counts = [p.shape[0] for p in pixel_values]
        feats = self.vision_tower(torch.cat(pixel_values))  # (N, 1 + P, C)
        if self.cfg.vision_feature_select == "default":
            feats = feats[:, 1:]
        feats = self.projector(feats)  # (N, P, D)
        return [self._merge(f, size) for f, size in zip(feats.split(counts), image_sizes, strict=True)]

    def _merge(self, feats: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """(1 + tiles, P, D) -> (tokens, D): base image first, then the tile grid (AnyRes)."""
        merge = self.cfg.patch_merge_type
        if merge == "flat":
            return feats.flatten(0, 1)
        if feats.shape[0] == 1:
            return torch.cat([feats[0], self.image_newline[None].to(feats)]) if merge == "spatial_unpad" else feats[0]
        g = self.cfg.vision.grid_size
        rows, cols = anyres_grid(image_hw, self.cfg.image.pinpoints, self.cfg.vision.image_size)
        if rows * cols != feats.shape[0] - 1:
            raise ValueError(f"image of size {image_hw} should have {rows}x{cols} tiles, got {feats.shape[0] - 1}")
        d = feats.shape[-1]
        grid = feats[1:].view(rows, cols, g, g, d).permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, d)
        if merge == "spatial_unpad":
            top, bottom, left, right = unpad_shape(image_hw, (rows * g, cols * g))
            grid = grid[top:bottom, left:right]
            newline = self.image_newline.to(grid).expand(grid.shape[0], 1, d)
            grid = torch.cat([grid, newline], dim=1)  # a newline embedding ends every row
        return torch.cat([feats[0], grid.flatten(0, 1)])

    def encode_videos(self, pixel_values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per video: frames (F, C, S, S) -> features (F * tokens_per_frame, D).

        Each frame's patch grid is pooled before the projector, as transformers does for llava-hf
        checkpoints (the LLaVA-NeXT code pools after it: other numbers). All frames go in one tower batch.
        """
        counts = [p.shape[0] for p in pixel_values]
        feats = self.vision_tower(torch.cat(pixel_values))[:, 1:]  # (N, P, C): patches, CLS dropped
        feats = self.projector(self._pool_frames(feats))  # (N, P', D)
        return [f.flatten(0, 1) for f in feats.split(counts)]

    def encode_media(self, pixel_values: list[torch.Tensor], image_sizes: list[tuple[int, int] | None]
                     ) -> list[torch.Tensor]:
        """Features of images and videos in the order given: an item with an (h, w) size is an image, one
        with None a video. All images go through `encode_images` in one call, all videos through
        `encode_videos` in another."""
        images = [i for i, size in enumerate(image_sizes) if size is not None]
        videos = [i for i, size in enumerate(image_sizes) if size is None]
        out: dict[int, torch.Tensor] = {}
        if images:
            out.update(zip(images, self.encode_images([pixel_values[i] for i in images],
                                                      [image_sizes[i] for i in images]), strict=True))
        if videos:
            out.update(zip(videos, self.encode_videos([pixel_values[i] for i in videos]), strict=True))
        return [out[i] for i in range(len(pixel_values))]

    def _pool_frames(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, g*g, C) -> (N, (g//s)**2, C): `average` or `max` pooling of the g x g grid, kernel = stride = s."""
        n, _, c = feats.shape
        g, s = self.cfg.vision.grid_size, self.cfg.spatial_pool_stride
        grid = feats.view(n, g, g, c).permute(0, 3, 1, 2)  # (N, C, g, g)
        pool = F.avg_pool2d if self.cfg.spatial_pool_mode == "average" else F.max_pool2d
        return pool(grid, kernel_size=s, stride=s).flatten(2).transpose(1, 2)

    def embed_inputs(self, input_ids: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """input_ids (B, T) with one placeholder per image or video feature -> embeddings (B, T, D).

        `features` holds one (tokens, D) tensor per image or video in the order their placeholder runs
        appear; image and video placeholders (different ids) are filled in that one order.
        """
        mask = input_ids == self.cfg.image_token_id
        if self.cfg.video_token_id is not None:
            mask |= input_ids == self.cfg.video_token_id
        n_slots = int(mask.sum())
        n_feats = sum(f.shape[0] for f in features or [])
        if n_slots != n_feats:
            raise ValueError(f"the input has {n_slots} image/video placeholder tokens but the images and videos "
                             f"give {n_feats} features; build input ids with the model's tokenize() "
                             "so the counts agree")
        embeds = self.language_model.embed_tokens(torch.where(mask, 0, input_ids))
        if n_feats:
            feats = torch.cat(features).to(embeds.dtype)
            embeds = embeds.masked_scatter(mask[..., None], feats)
        return embeds

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, kv_cache=None,
                meta: AttentionMetadata | None = None) -> torch.Tensor:
        """embeds (B, T, D), positions (B, T) -> final hidden states (B, T, D)."""
        return self.language_model(embeds, positions, kv_cache, meta or AttentionMetadata())

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., vocab)."""
        return self.lm_head(hidden)
