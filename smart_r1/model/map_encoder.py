"""Map encoder: embeds map segments and lets each attend to its nearest neighbours, once per scene."""

from __future__ import annotations

import torch
from torch import nn

from smart_r1.model.config import ModelConfig
from smart_r1.model.layers import FourierEmbedding, RelAttention, gather_rows, knn, rel_pose_features
from smart_r1.tokens.map_tokens import NUM_SUBTYPES, NUM_TL_STATES, SEGMENT_FEATURES
from smart_r1.types import MAP_KINDS


class MapEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim
        self.cfg = cfg
        self.geometry = nn.Sequential(nn.Linear(SEGMENT_FEATURES, d), nn.LayerNorm(d), nn.ReLU(), nn.Linear(d, d))
        self.kind = nn.Embedding((len(MAP_KINDS) + 1) * NUM_SUBTYPES, d)
        self.signal = nn.Embedding(NUM_TL_STATES, d)
        self.rel = FourierEmbedding(3, d, cfg.num_freqs)
        self.layers = nn.ModuleList(RelAttention(d, cfg.num_heads, cfg.ff_mult, cfg.dropout, self_attention=True)
                                    for _ in range(cfg.map_layers))

    def forward(self, pose: torch.Tensor, features: torch.Tensor, kind_subtype: torch.Tensor, tl: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """pose [B, M, 3], features [B, M, F], kind_subtype / tl long [B, M], mask bool [B, M] -> [B, M, D]."""
        x = self.geometry(features) + self.kind(kind_subtype) + self.signal(tl)  # [B, M, D]
        index, near = knn(pose[..., :2], pose[..., :2], mask, self.cfg.map_neighbours, self.cfg.map_radius)  # [B, M, K]
        rel = self.rel(rel_pose_features(pose[:, :, None], gather_rows(pose, index)))  # [B, M, K, D]
        for layer in self.layers:
            k, v = layer.project_kv(x)  # [B, M, D] each
            x = layer(x, gather_rows(k, index), gather_rows(v, index), rel, near)  # [B, M, D]
        return x * mask[..., None]
