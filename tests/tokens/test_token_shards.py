"""Token shards: a scene read back from a token shard equals build_scene's, tensor for tensor (so
training on token shards is training on today's scenes); the cached step's key and its reuse."""

from __future__ import annotations

import dataclasses

import pytest

from smart_r1.data.dataset import iter_scenarios
from smart_r1.data.index import ShardIndex
from smart_r1.data.parquet import write_shard
from smart_r1.tokens.cache import STAGE_OPTIONS, token_folder, tokenize_shard, vocab_hash
from smart_r1.tokens.motion_vocab import MotionVocab, build_vocab
from smart_r1.tokens.scene import build_scene
from smart_r1.tokens.shards import scene_bytes, scene_from_bytes, table_to_scenes, write_token_shard


@pytest.fixture(scope="module")
def records(sumo_shards, womd_record):
    return [womd_record, *iter_scenarios(sumo_shards)]


@pytest.fixture(scope="module")
def vocab(records) -> MotionVocab:
    return build_vocab(records, size=16, iters=3)


@pytest.mark.parametrize("kind", ["bc", "catk_sft"])
def test_scenes_from_a_token_shard_equal_build_scene(kind, records, vocab, tmp_path, assert_same_scene):
    options = STAGE_OPTIONS[kind]
    source = write_shard(tmp_path / "data.parquet", records)
    result = tokenize_shard(str(source), str(tmp_path / "tokens.parquet"), vocab, options)
    assert result == {"shard": "tokens.parquet", "scenes": len(records), "records": len(records), "skipped": False}
    scenes = ShardIndex([str(tmp_path / "tokens.parquet")], table_to_scenes).read(list(range(len(records))))
    for record, scene in zip(records, scenes):
        assert_same_scene(scene, build_scene(record, vocab, agents=options.agents, max_agents=options.max_agents))
    again = tokenize_shard(str(source), str(tmp_path / "tokens.parquet"), vocab, options)
    assert again["skipped"]


def test_sim_scenes_leave_out_records_without_sim_agents(records, vocab, tmp_path):
    now = records[0].current_time_index
    valid = records[0].valid.copy()
    valid[:, now] = False
    nobody = records[0].replace(scenario_id="nobody_now", valid=valid)
    source = write_shard(tmp_path / "data.parquet", [nobody, records[1]])
    sim = tokenize_shard(str(source), str(tmp_path / "sim.parquet"), vocab, STAGE_OPTIONS["catk_sft"])
    everyone = tokenize_shard(str(source), str(tmp_path / "all.parquet"), vocab, STAGE_OPTIONS["bc"])
    assert (sim["scenes"], everyone["scenes"]) == (1, 2)
    (scene,) = ShardIndex([str(tmp_path / "sim.parquet")], table_to_scenes).read([0])
    assert scene.scenario_id == [records[1].scenario_id]


def test_a_batch_is_not_a_row_and_an_empty_shard_is_written(records, vocab, tmp_path, assert_same_scene):
    one = build_scene(records[1], vocab)
    assert_same_scene(scene_from_bytes(scene_bytes(one), one.scenario_id[0]), one)
    with pytest.raises(ValueError, match="one scene"):
        scene_bytes(dataclasses.replace(one, agent_mask=one.agent_mask.repeat(2, 1)))
    write_token_shard(tmp_path / "empty.parquet", [])
    assert len(ShardIndex([str(tmp_path / "empty.parquet")], table_to_scenes)) == 0


def test_the_cache_key_follows_the_vocabulary_and_the_options(records, vocab):
    same = MotionVocab(vocab.contours.clone())
    other = build_vocab(records, size=16, iters=3, seed=1)
    assert vocab_hash(same) == vocab_hash(vocab) != vocab_hash(other)
    folders = {token_folder("s3://b/run?x=1", v, o) for v in (vocab, other) for o in STAGE_OPTIONS.values()}
    assert len(folders) == 4 and all(f.startswith("s3://b/run/tokens/") and f.endswith("?x=1") for f in folders)
