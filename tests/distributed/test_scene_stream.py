"""What a learner rank and a rollout actor read, without Ray: a rank streams the token shards
(scenes equal to tokenising the records it reads), ranks split an epoch, a token folder of another
vocabulary is refused; an actor reads only the scenarios it is handed, with bounded caches."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from smart_r1.config import BCStage, CatKStage, from_dict
from smart_r1.data.dataset import iter_scenarios
from smart_r1.data.parquet import shard_paths
from smart_r1.data.stream import epoch_rows, rank_units
from smart_r1.distributed import rollout_worker
from smart_r1.distributed.pipeline import prepare_tokens
from smart_r1.distributed.rollout_worker import RolloutSpec, RolloutWorker
from smart_r1.distributed.supervised_loop import batches, scene_source
from smart_r1.distributed.worker_kit import LearnerJob
from smart_r1.model.checkpoint import save_checkpoint
from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.tokens.cache import STAGE_OPTIONS, mark_done, token_folder, tokenize_shard
from smart_r1.storage import write_json
from smart_r1.tokens.motion_vocab import build_vocab
from smart_r1.types import Experience


@pytest.fixture(scope="module")
def vocab(sumo_shards):
    return build_vocab(iter_scenarios(sumo_shards), size=16, iters=3)


def tokenised(data: Path, root: Path, vocab, kind: str) -> str:
    """The token folder the pipeline's step makes, made here shard by shard (no Ray)."""
    options = STAGE_OPTIONS[kind]
    folder = token_folder(str(root), vocab, options)
    sources = [str(p) for p in shard_paths(data)]
    for source in sources:
        tokenize_shard(source, f"{folder}/{Path(source).name}", vocab, options)
    mark_done(folder, str(data), vocab, options, sources)
    return folder


def job(stage, data: Path, scenes: str = "") -> LearnerJob:
    return LearnerJob(stage=stage, stage_dir="unused", init_checkpoint=None, datasets={"train": str(data)},
                      scenes=scenes)


@pytest.mark.parametrize("stage", [BCStage(name="bc"), CatKStage(name="sft")])
def test_a_rank_reads_token_shards_equal_to_tokenising_its_records(stage, sumo_shards, vocab, tmp_path,
                                                                   assert_same_scene):
    folder = tokenised(sumo_shards, tmp_path, vocab, stage.kind)
    stored, live = scene_source(job(stage, sumo_shards, folder), vocab), scene_source(job(stage, sumo_shards), vocab)
    assert (stored.units, stored.total) == (live.units, live.total) == (2, 6)  # two shards of one row group
    for unit in range(stored.units):
        for a, b in zip(stored.read_unit(unit), live.read_unit(unit), strict=True):
            assert_same_scene(a, b)


def test_two_ranks_split_an_epoch_and_batch_within_their_part(sumo_shards, vocab, tmp_path):
    source = scene_source(job(BCStage(name="bc"), sumo_shards, tokenised(sumo_shards, tmp_path, vocab, "bc")), vocab)
    seen = []
    for rank in range(2):
        units = rank_units(source.units, rank, 2, random.Random(7))
        rng = random.Random(rank)
        drawn = list(batches(epoch_rows(source.read_unit, units, 3, 128, rng), 1, rng))
        assert len(drawn) == 3  # ceil(6 scenes / 2 ranks / batch 1) steps
        seen += [s.scenario_id[0] for b in drawn for s in b]
    assert sorted(seen) == sorted(r.scenario_id for r in iter_scenarios(sumo_shards))


def test_token_shards_of_another_vocabulary_are_refused(sumo_shards, vocab, tmp_path):
    other = build_vocab(iter_scenarios(sumo_shards), size=16, iters=3, seed=3)
    folder = tokenised(sumo_shards, tmp_path, other, "bc")
    with pytest.raises(ValueError, match="vocabulary"):
        scene_source(job(BCStage(name="bc"), sumo_shards, folder), vocab)


def test_an_actor_reads_only_what_it_is_handed(sumo_shards, vocab, tmp_path, monkeypatch):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", SmartTiny(ModelConfig.preset("test", vocab_size=16), vocab))
    monkeypatch.setattr(rollout_worker, "SCENE_CACHE", 2)
    actor = RolloutWorker((tmp_path / "m.pt").read_bytes(), {"train": str(sumo_shards)})
    assert actor.num_scenarios("train") == 6
    index = actor._index("train")
    assert len(index._cache) == 0  # opening read the footers only
    records = list(iter_scenarios(sumo_shards))
    out = actor.rollout(-1, [], "train", [4, 0, 5], RolloutSpec(num_rollouts=2))
    assert all(isinstance(e, Experience) for e in out), out
    assert [e.scenario_id for e in out] == [records[i].scenario_id for i in (4, 0, 5)]
    assert len(index._cache) <= 2 and list(actor._scenes) == [("train", 0), ("train", 5)]
    assert actor.info()["peak_rss_mb"] > 0


def test_the_pipeline_tokenises_for_unfinished_supervised_stages_on_parquet_only(tmp_path, womd_path, capsys):
    config = from_dict({"out_dir": str(tmp_path), "stages": [{"name": "bc", "kind": "bc"},
                                                             {"name": "sft", "kind": "catk_sft"},
                                                             {"name": "rft", "kind": "mpo"}]})
    for stage in ("bc", "sft"):
        write_json(tmp_path / stage / "done.json", {})
    assert prepare_tokens(config, {"train": "never/read"}, str(tmp_path), "never/read.pt") == {}
    (tmp_path / "sft" / "done.json").unlink()
    assert prepare_tokens(config, {"train": str(womd_path)}, str(tmp_path), "never/read.pt") == {}
    assert "learners tokenise as they read" in capsys.readouterr().out
