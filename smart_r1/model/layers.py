"""Building blocks of SMART-tiny: relative-pose Fourier features, radius/k-nearest neighbour search on
dense padded tensors, and a pre-norm attention layer whose keys and values carry relative poses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from smart_r1.tokens.geometry import relative

# Distances enter the Fourier features in units of 10 m, time in units of 10 slots (5 s).
_DIST_SCALE, _TIME_SCALE = 0.1, 0.1
# gather_rows by an embedding lookup (False: advanced indexing, the reference; see use_fast_paths)
_GATHER_BY_EMBEDDING = True


def rel_pose_features(query_pose: torch.Tensor, key_pose: torch.Tensor, dt: torch.Tensor | None = None) -> torch.Tensor:
    """Rotation- and translation-invariant description of a key pose seen from a query pose.

    query_pose, key_pose [..., 3] (broadcastable), dt [...] optional slot difference
    -> [..., 3 or 4]: distance, bearing in the query frame, relative heading (, time difference)."""
    rel = relative(query_pose, key_pose)  # [..., 3]
    dist = rel[..., :2].norm(dim=-1)  # [...]
    bearing = torch.atan2(rel[..., 1], rel[..., 0])  # [...]
    feats = [dist * _DIST_SCALE, bearing, rel[..., 2]]
    if dt is not None:
        feats.append(dt.to(dist.dtype).expand_as(dist) * _TIME_SCALE)
    return torch.stack(feats, -1)  # [..., 3 or 4]


class FourierEmbedding(nn.Module):
    """Scalars [..., in_dim] -> [..., dim]: learned-frequency sin/cos features, then an MLP."""

    def __init__(self, in_dim: int, dim: int, num_freqs: int):
        super().__init__()
        self.freqs = nn.Parameter(torch.randn(in_dim, num_freqs))
        self.mlp = nn.Sequential(nn.Linear(in_dim * (2 * num_freqs + 1), dim), nn.LayerNorm(dim), nn.ReLU(),
                                 nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angle = x[..., None] * self.freqs * (2 * math.pi)  # [..., in_dim, F]
        feats = torch.cat([angle.cos(), angle.sin(), x[..., None]], -1)  # [..., in_dim, 2F + 1]
        return self.mlp(feats.flatten(-2))  # [..., dim]


def knn(query_xy: torch.Tensor, key_xy: torch.Tensor, key_mask: torch.Tensor, k: int, radius: float,
        exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest valid keys within `radius` of each query, per batch row.

    query_xy [B, Q, 2], key_xy [B, N, 2], key_mask bool [B, N]
    -> index long [B, Q, k'] into N, valid bool [B, Q, k'], with k' = min(k, N)."""
    d = torch.cdist(query_xy.float(), key_xy.float())  # [B, Q, N]
    d = d.masked_fill(~key_mask[:, None, :], float("inf"))
    if exclude_self:  # query i and key i are the same element
        eye = torch.eye(d.shape[1], d.shape[2], dtype=torch.bool, device=d.device)
        d = d.masked_fill(eye, float("inf"))
    kk = min(k, d.shape[-1])
    dist, index = d.topk(kk, dim=-1, largest=False)  # [B, Q, k']
    return index, dist < radius


def gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """src [B, N, ...], index long [B, *q] -> [B, *q, ...] (rows of each batch element).

    An embedding lookup into the flattened rows: its backward (a sorted index-add) took a third
    of the time of advanced indexing's scatter (`index_put_`) on the map encoder's
    [4, 2048, 32, 128] gathers (2-core AMD EPYC)."""
    b, n, feat = src.shape[0], src.shape[1], src.shape[2:]
    if not _GATHER_BY_EMBEDDING:
        return src[torch.arange(b, device=src.device).view(-1, *([1] * (index.ndim - 1))), index]
    if b == 1 or src.stride(0) == 0:  # one scene, or one scene's rows shared by all (an expanded view)
        rows, flat = src[0].reshape(n, -1), index.expand(b, *index.shape[1:]) if index.shape[0] != b else index
    else:
        offset = (torch.arange(b, device=src.device) * n).view(-1, *([1] * (index.ndim - 1)))  # [B, 1, ...]
        rows, flat = src.reshape(b * n, -1), index + offset
    return F.embedding(flat, rows).view(*flat.shape, *feat)  # [B, *q, ...]


class RelAttention(nn.Module):
    """Pre-norm multi-head attention, then a feed-forward block, both residual.

    Keys and values are `to_k(key source) + rel_k(relative pose embedding)` (likewise for values),
    so the part that depends only on the key source can be computed once and cached.

    `factored` (default) computes the same attention with rel_k and rel_v applied on the query
    side (they are linear without bias, so the algebra is exact; results differ by rounding
    only): projecting every key's relative pose was 58% of the `default` preset's forward
    FLOPs, and the BC step ran 1.37x faster without it (BENCHMARKS.md)."""

    factored = True

    def __init__(self, dim: int, heads: int, ff_mult: int, dropout: float, self_attention: bool):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = self.norm_q if self_attention else nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim)
        self.rel_k = nn.Linear(dim, dim, bias=False)
        self.rel_v = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(ff_mult * dim, dim))
        self.drop = nn.Dropout(dropout)

    def project_kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value parts of a key source [..., D] -> ([..., D], [..., D])."""
        s = self.norm_kv(source)
        return self.to_k(s), self.to_v(s)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """x [*, D]; k, v [*, K, D] (projected sources, broadcastable); rel [*, K, D]; mask [*, K]."""
        lead, d = x.shape[:-1], x.shape[-1]
        h, dh = self.heads, d // self.heads
        q = self.to_q(self.norm_q(x)).view(*lead, h, dh)  # [*, H, dh]
        kh, vh = k.view(*k.shape[:-1], h, dh), v.view(*v.shape[:-1], h, dh)  # [*, K, H, dh]
        if self.factored:
            # q_h . (k_h + W_k,h r) = q_h . k_h + (W_k,h^T q_h) . r: the relative pose's key part is
            # taken on the query side, D^2 per query instead of K D^2 (once per key)
            q_rel = torch.einsum("...hd,hde->...he", q, self.rel_k.weight.view(h, dh, d))  # [*, H, D]
            score = (torch.einsum("...hd,...khd->...hk", q, kh)
                     + torch.einsum("...he,...ke->...hk", q_rel, rel))  # [*, H, K]
        else:  # the reference formulation: every key's relative pose projected
            score = torch.einsum("...hd,...khd->...hk", q, kh + self.rel_k(rel).view(*rel.shape[:-1], h, dh))
        score = score / math.sqrt(dh)
        score = score.masked_fill(~mask[..., None, :], torch.finfo(score.dtype).min)
        attn = score.softmax(-1) * mask[..., None, :]  # [*, H, K], zero on masked keys
        if self.factored:
            # sum_j a_hj (v_hj + W_v,h r_j) = sum_j a_hj v_hj + W_v,h (sum_j a_hj r_j)
            rel_mean = torch.einsum("...hk,...ke->...he", attn, rel)  # [*, H, D]
            o = (torch.einsum("...hk,...khd->...hd", attn, vh)
                 + torch.einsum("...he,hde->...hd", rel_mean, self.rel_v.weight.view(h, dh, d)))  # [*, H, dh]
        else:
            o = torch.einsum("...hk,...khd->...hd", attn, vh + self.rel_v(rel).view(*rel.shape[:-1], h, dh))
        o = o.reshape(*lead, d) * mask.any(-1, keepdim=True)  # [*, D]; no key in reach: no update
        x = x + self.drop(self.out(o))
        return x + self.drop(self.ff(self.norm_ff(x)))


def use_fast_paths(module: nn.Module, on: bool = True) -> None:
    """Switch between the faster forms (default) and the reference forms they are checked and
    benchmarked against: every RelAttention in `module` factored or projecting each key's
    relative pose, and (process-wide) gather_rows by embedding lookup or advanced indexing."""
    global _GATHER_BY_EMBEDDING
    _GATHER_BY_EMBEDDING = on
    for m in module.modules():
        if isinstance(m, RelAttention):
            m.factored = on
