"""Agent decoder: motion-token embeddings refined by blocks of temporal, map-to-agent and
agent-to-agent attention, then a next-token head over the motion vocabulary.

A node is one agent at one token slot. Slot t holds token t (the motion from step 5 t to 5 t + 5)
and the pose it reached (anchor t + 1). With a `DecoderCache`, calling the decoder slot by slot
gives exactly the logits of the full causal pass, while each call attends from the new slot only:
the temporal keys and values of earlier slots are read from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from smart_r1.model.config import ModelConfig
from smart_r1.model.layers import FourierEmbedding, RelAttention, gather_rows, knn, rel_pose_features
from smart_r1.tokens.motion_vocab import NUM_TYPES, SHIFT


@dataclass
class DecoderCache:
    """Per-block temporal keys/values and the poses/validity of the slots decoded so far.

    k, v: lists (one per block) of [B, A, T_max, D]; pose [B, A, T_max, 3]; valid bool [B, A, T_max]."""

    k: list
    v: list
    pose: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def empty(cls, b: int, a: int, slots: int, dim: int, blocks: int, device, dtype=torch.float32) -> "DecoderCache":
        def z():
            return torch.zeros(b, a, slots, dim, device=device, dtype=dtype)
        return cls([z() for _ in range(blocks)], [z() for _ in range(blocks)],
                   torch.zeros(b, a, slots, 3, device=device), torch.zeros(b, a, slots, dtype=torch.bool, device=device))


@dataclass(frozen=True)
class MapContext:
    """A scene's encoded map: pose [B, M, 3], mask [B, M], and per decoder block the map-to-agent
    layer's projected keys and values, each [B, M, D] (may be expanded views shared by rollouts)."""

    pose: torch.Tensor
    mask: torch.Tensor
    kv: tuple

    def repeat(self, n: int) -> "MapContext":
        """[B, ...] -> [B * n, ...] as views (no copy), scene-major."""
        def rep(t):
            if t.shape[0] == 1:
                return t.expand(n, *t.shape[1:])  # [n, ...], a view
            return t.repeat_interleave(n, 0)  # [B * n, ...]
        return MapContext(rep(self.pose), rep(self.mask), tuple((rep(k), rep(v)) for k, v in self.kv))


class AgentDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, contours: torch.Tensor):
        super().__init__()
        d = cfg.dim
        self.cfg = cfg
        self.register_buffer("contours", contours.float(), persistent=False)  # [NUM_TYPES, V, SHIFT, 3]
        self.token_mlp = nn.Sequential(nn.Linear(SHIFT * 4, d), nn.LayerNorm(d), nn.ReLU(), nn.Linear(d, d))
        self.type_emb = nn.Embedding(NUM_TYPES, d)
        self.rel_time = FourierEmbedding(4, d, cfg.num_freqs)
        self.rel_map = FourierEmbedding(3, d, cfg.num_freqs)
        self.rel_agent = FourierEmbedding(3, d, cfg.num_freqs)

        def attn(self_attention):
            return RelAttention(d, cfg.num_heads, cfg.ff_mult, cfg.dropout, self_attention)
        self.temporal = nn.ModuleList(attn(True) for _ in range(cfg.agent_blocks))
        self.map_to_agent = nn.ModuleList(attn(False) for _ in range(cfg.agent_blocks))
        self.agent_to_agent = nn.ModuleList(attn(True) for _ in range(cfg.agent_blocks))
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.vocab_size))

    def map_kv(self, map_x: torch.Tensor) -> tuple:
        """Per block (k, v) [B, M, D] of the map-to-agent layers, computed once per scene."""
        return tuple(layer.project_kv(map_x) for layer in self.map_to_agent)

    def embed_tokens(self, tokens: torch.Tensor, agent_type: torch.Tensor) -> torch.Tensor:
        """tokens long [B, A, T], agent_type long [B, A] -> [B, A, T, D] from the tokens' contours."""
        c = self.contours[agent_type[:, :, None], tokens]  # [B, A, T, SHIFT, 3]
        feats = torch.cat([c[..., :2], c[..., 2:].cos(), c[..., 2:].sin()], -1).flatten(-2)  # [B, A, T, SHIFT * 4]
        return self.token_mlp(feats) + self.type_emb(agent_type)[:, :, None]  # [B, A, T, D]

    def forward(self, tokens: torch.Tensor, agent_type: torch.Tensor, pose: torch.Tensor, valid: torch.Tensor,
                map_ctx: MapContext, start: int = 0, cache: DecoderCache | None = None) -> torch.Tensor:
        """Logits [B, A, T, V] for slots start .. start + T - 1.

        tokens long [B, A, T], agent_type long [B, A], pose [B, A, T, 3] (pose reached by each token),
        valid bool [B, A, T]. Without a cache the T slots are the whole causal context."""
        cfg = self.cfg
        b, a, t = tokens.shape
        x = self.embed_tokens(tokens, agent_type)  # [B, A, T, D]
        q_slot = torch.arange(start, start + t, device=x.device)  # [T]
        if cache is not None:
            cache.pose[:, :, start:start + t] = pose
            cache.valid[:, :, start:start + t] = valid
            key_pose, key_valid = cache.pose[:, :, :start + t], cache.valid[:, :, :start + t]  # [B, A, Tk, ...]
            k_slot = torch.arange(start + t, device=x.device)  # [Tk]
        else:
            key_pose, key_valid, k_slot = pose, valid, q_slot
        dt = q_slot[:, None] - k_slot[None, :]  # [T, Tk]
        rel_t = self.rel_time(rel_pose_features(pose[:, :, :, None], key_pose[:, :, None], dt))  # [B, A, T, Tk, D]
        mask_t = (dt >= 0) & (dt < cfg.time_window) & key_valid[:, :, None, :]  # [B, A, T, Tk]

        m_index, m_near = knn(pose[..., :2].reshape(b, a * t, 2), map_ctx.pose[..., :2], map_ctx.mask,
                              cfg.agent_map_neighbours, cfg.agent_map_radius)  # [B, A * T, Km]
        m_index, m_near = m_index.view(b, a, t, -1), m_near.view(b, a, t, -1)  # [B, A, T, Km]
        rel_m = self.rel_map(rel_pose_features(pose[..., None, :], gather_rows(map_ctx.pose, m_index)))  # [B, A, T, Km, D]

        pose_bt = pose.transpose(1, 2).reshape(b * t, a, 3)  # [B * T, A, 3]
        a_index, a_near = knn(pose_bt[..., :2], pose_bt[..., :2], valid.transpose(1, 2).reshape(b * t, a),
                              cfg.agent_neighbours, cfg.agent_radius, exclude_self=True)  # [B * T, A, Ka]
        rel_a = self.rel_agent(rel_pose_features(pose_bt[:, :, None], gather_rows(pose_bt, a_index)))  # [B * T, A, Ka, D]

        for i in range(cfg.agent_blocks):
            k, v = self.temporal[i].project_kv(x)  # [B, A, T, D]
            if cache is not None:
                cache.k[i][:, :, start:start + t] = k.to(cache.k[i].dtype)
                cache.v[i][:, :, start:start + t] = v.to(cache.v[i].dtype)
                k, v = cache.k[i][:, :, :start + t], cache.v[i][:, :, :start + t]  # [B, A, Tk, D]
            x = self.temporal[i](x, k[:, :, None], v[:, :, None], rel_t, mask_t)  # [B, A, T, D]

            mk, mv = map_ctx.kv[i]  # [B, M, D]
            x = self.map_to_agent[i](x, gather_rows(mk, m_index), gather_rows(mv, m_index), rel_m, m_near)

            xa = x.transpose(1, 2).reshape(b * t, a, -1)  # [B * T, A, D]
            k, v = self.agent_to_agent[i].project_kv(xa)  # [B * T, A, D]
            xa = self.agent_to_agent[i](xa, gather_rows(k, a_index), gather_rows(v, a_index), rel_a, a_near)
            x = xa.view(b, t, a, -1).transpose(1, 2)  # [B, A, T, D]
        return self.head(x)  # [B, A, T, V]
