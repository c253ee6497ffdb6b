"""Token shards: tokenised scenes (`build_scene`'s SceneBatch, B = 1) stored as Parquet rows, so
that training reads scenes instead of tokenising records.

Schema (one row = one scene; row groups of `parquet.ROW_GROUP_ROWS`, as the scenario shards):

    scenario_id   string
    num_agents    int32    A, the scene's agent slots (what `collate` pads; size bucketing)
    num_map       int32    M, its map-segment slots
    scene         binary   `torch.save` of {field: tensor} for every tensor field of SceneBatch,
                           each cloned to its own storage (a view would save its whole base)

Written like scenario shards (`parquet.write_table`): whole or not at all, local or URI.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import torch

from smart_r1.data.parquet import write_table
from smart_r1.tokens.scene import SceneBatch, scene_size

SCHEMA = pa.schema([pa.field("scenario_id", pa.string()), pa.field("num_agents", pa.int32()),
                    pa.field("num_map", pa.int32()), pa.field("scene", pa.binary())])
_TENSORS = tuple(f.name for f in dataclasses.fields(SceneBatch) if f.name != "scenario_id")


def scene_bytes(scene: SceneBatch) -> bytes:
    """One scene (B = 1) as bytes; `scene_from_bytes` gives it back, tensor for tensor."""
    if scene.num_scenes != 1:
        raise ValueError(f"a token shard row holds one scene, got a batch of {scene.num_scenes}")
    buffer = io.BytesIO()
    torch.save({name: getattr(scene, name).detach().cpu().clone() for name in _TENSORS}, buffer)
    return buffer.getvalue()


def scene_from_bytes(data: bytes, scenario_id: str) -> SceneBatch:
    tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return SceneBatch(scenario_id=[scenario_id], **{name: tensors[name] for name in _TENSORS})


def scenes_to_table(scenes: Sequence[SceneBatch]) -> pa.Table:
    sizes = [scene_size(s) for s in scenes]
    return pa.table({"scenario_id": [s.scenario_id[0] for s in scenes],
                     "num_agents": [a for a, _ in sizes], "num_map": [m for _, m in sizes],
                     "scene": [scene_bytes(s) for s in scenes]}, schema=SCHEMA)


def table_to_scenes(table: pa.Table) -> list[SceneBatch]:
    """The scenes of one row group's table, in row order."""
    ids, blobs = table.column("scenario_id").to_pylist(), table.column("scene").to_pylist()
    return [scene_from_bytes(b, i) for i, b in zip(ids, blobs)]


def write_token_shard(path: str | Path, scenes: Sequence[SceneBatch]) -> str:
    """Write scenes to `path` (local or URI) atomically; an empty list writes an empty shard (a
    source shard whose scenes were all left out still marks its work as done)."""
    return str(write_table(path, scenes_to_table(scenes)))
