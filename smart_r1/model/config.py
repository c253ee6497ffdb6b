"""The SMART-tiny configuration: one frozen dataclass, stored in checkpoints as a plain dict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and neighbourhoods of SMART-tiny. The defaults (`default` preset, 5.5M parameters at
    2048 tokens) follow SMART-tiny's decoder as CAT-K and SMART-R1 train it: width 128, 8 heads,
    64 Fourier bands, dropout 0.1, 3 map layers, 6 agent layers, map-map radius 10 m, map-agent
    30 m, agent-agent 60 m, temporal span 30 steps (3 s = 6 token slots back). Our embeddings and
    head are simpler than SMART's (which counts 7M)."""

    vocab_size: int = 2048  # motion tokens per agent type (the head's output size)
    dim: int = 128  # hidden width of every token
    num_heads: int = 8
    map_layers: int = 3  # attention layers among map segments
    agent_blocks: int = 6  # decoder blocks, each temporal + map-to-agent + agent-to-agent attention
    ff_mult: int = 4  # feed-forward width = ff_mult * dim
    num_freqs: int = 64  # Fourier frequencies per relative-pose scalar
    dropout: float = 0.1
    map_neighbours: int = 32  # map segments each map segment attends to ...
    map_radius: float = 10.0  # ... within this radius (m)
    agent_map_neighbours: int = 32  # map segments each agent token attends to ...
    agent_map_radius: float = 30.0
    agent_neighbours: int = 16  # other agents each agent token attends to ...
    agent_radius: float = 60.0
    time_window: int = 7  # token slots each token attends to, itself included (7: 3 s back; 17: all)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """'default': SMART-tiny (GPU, paper). 'cpu': ~0.6M, for BC on a 2-core machine (narrower,
        1 map layer, 2 decoder blocks, fewer neighbours, wider map radius and the whole history).
        'test': tiny, for unit tests."""
        presets = {
            "default": {},
            "cpu": dict(dim=64, num_heads=4, map_layers=1, agent_blocks=2, num_freqs=16, map_radius=30.0,
                        map_neighbours=16, agent_map_neighbours=16, agent_neighbours=8, dropout=0.0,
                        time_window=17),
            "test": dict(vocab_size=64, dim=32, num_heads=4, map_layers=1, agent_blocks=1, num_freqs=8,
                         map_neighbours=8, agent_map_neighbours=8, agent_neighbours=8, ff_mult=2,
                         map_radius=30.0, time_window=17),
        }
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(presets)}")
        return dataclasses.replace(cls(**presets[name]), **overrides)
