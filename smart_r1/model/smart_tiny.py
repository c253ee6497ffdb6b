"""SMART-tiny: map encoder + agent decoder over motion tokens, teacher-forced or slot by slot."""

from __future__ import annotations

import torch
from torch import nn

from smart_r1.model.agent_decoder import AgentDecoder, DecoderCache, MapContext
from smart_r1.model.config import ModelConfig
from smart_r1.model.map_encoder import MapEncoder
from smart_r1.tokens.motion_vocab import NUM_TOKENS, MotionVocab
from smart_r1.tokens.scene import SceneBatch

NUM_SLOTS = NUM_TOKENS - 1  # 17 input slots: token t predicts token t + 1


class SmartTiny(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab: MotionVocab):
        super().__init__()
        if vocab.size != cfg.vocab_size:
            raise ValueError(f"vocabulary has {vocab.size} tokens per type but the model config expects "
                             f"{cfg.vocab_size}")
        self.cfg = cfg
        self.vocab = vocab.validate()
        self.map_encoder = MapEncoder(cfg)
        self.decoder = AgentDecoder(cfg, vocab.contours)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode_map(self, batch: SceneBatch) -> MapContext:
        """Encode each scene's map once: MapContext with B = batch.num_scenes."""
        x = self.map_encoder(batch.map_pose, batch.map_features, batch.map_kind_subtype, batch.map_tl,
                             batch.map_mask)  # [B, M, D]
        return MapContext(batch.map_pose, batch.map_mask, self.decoder.map_kv(x))

    def decode(self, map_ctx: MapContext, tokens: torch.Tensor, agent_type: torch.Tensor, pose: torch.Tensor,
               valid: torch.Tensor, start: int = 0, cache: DecoderCache | None = None) -> torch.Tensor:
        """Next-token logits [B, A, T, V] of slots start .. start + T - 1 (see AgentDecoder.forward)."""
        return self.decoder(tokens, agent_type, pose, valid, map_ctx, start, cache)

    def new_cache(self, b: int, a: int, dtype=torch.float32) -> DecoderCache:
        return DecoderCache.empty(b, a, NUM_SLOTS, self.cfg.dim, self.cfg.agent_blocks, self.device, dtype)

    def forward(self, batch: SceneBatch) -> torch.Tensor:
        """Teacher-forced logits [B, A, 17, V]; slot t predicts token t + 1 (see teacher_inputs)."""
        tokens, pose, valid = teacher_inputs(batch)
        return self.decode(self.encode_map(batch), tokens, batch.agent_type, pose, valid)


def teacher_inputs(batch: SceneBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logged inputs of the 17 slots: tokens [B, A, 17], poses reached [B, A, 17, 3], valid [B, A, 17]."""
    return batch.tokens[:, :, :-1], batch.anchor_pose[:, :, 1:-1], batch.token_valid[:, :, :-1]


def teacher_targets(batch: SceneBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [B, A, 17] and where they count [B, A, 17]: both this and the next token valid."""
    return batch.tokens[:, :, 1:], batch.token_valid[:, :, 1:] & batch.token_valid[:, :, :-1]
