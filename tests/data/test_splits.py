"""Real-scene splits: a fixed function of the scene id (windows of one recording together, old
scenes never moved by new ones), written as Parquet folders per split from the real WOMD scenes in
../shared and reused; and generated SUMO evaluation sets with one scenario per network."""

from __future__ import annotations

import glob
import shutil
from collections import Counter
from pathlib import Path

import pytest

from smart_r1.data.dataset import iter_scenarios
from smart_r1.data.splits import SPLITS, independent_unit, scene_id, split_of, split_real_scenes
from smart_r1.data.sumo import SumoConfig, complete_dataset, make_dataset
from smart_r1.data.womd import read_scenarios

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "womd" / "real"


@pytest.fixture(scope="module")
def real_ids() -> list[str]:
    if not REAL.is_dir():
        pytest.skip(f"real WOMD scenes not found at {REAL}")
    return sorted(Path(p).name.removesuffix(".tfrecord") for p in glob.glob(str(REAL / "*.tfrecord")))


def test_split_is_a_function_of_the_scene(real_ids):
    splits = {i: split_of(i) for i in real_ids}
    windows = [i for i in real_ids if "_w" in i]
    assert windows, "the shared set has windows of 20 s scenes"
    for w in windows:  # every window of a recording lands where the recording does
        assert scene_id(w) == w.rsplit("_w", 1)[0] and splits[w] == split_of(scene_id(w))
    # about 50 / 20 / 30 % of the scenes, and every split has some
    counts = Counter(split_of(s) for s in {scene_id(i) for i in real_ids})
    assert set(counts) == set(SPLITS)
    total = sum(counts.values())
    assert 0.35 < counts["train"] / total < 0.65 and 0.1 < counts["tune"] / total < 0.35
    # adding scenes moves none of the old ones
    more = real_ids + [f"{k:016x}" for k in range(500)]
    assert {i: split_of(i) for i in more if i in splits} == splits
    assert independent_unit("61fa872f2d274223_w1") == "61fa872f2d274223"


def test_real_scenes_are_written_per_split_and_reused(real_ids, tmp_path):
    source = tmp_path / "real"
    source.mkdir()
    chosen = [i for i in real_ids if "_w" in i][:2] + [i for i in real_ids if "_w" not in i][:8]
    for i in chosen:
        shutil.copy(REAL / f"{i}.tfrecord", source / f"{i}.tfrecord")
    out = tmp_path / "run" / "data" / "real"
    folders = split_real_scenes(str(source), str(out), verbose=False)
    written = {split: [r.scenario_id for r in iter_scenarios(folder)] for split, folder in folders.items()}
    expected = {s: sorted(i for i in chosen if split_of(i) == s) for s in SPLITS}
    assert {s: sorted(ids) for s, ids in written.items()} == {s: ids for s, ids in expected.items() if ids}
    record = next(read_scenarios(source / f"{chosen[0]}.tfrecord"))
    again = next(r for r in iter_scenarios(folders[split_of(chosen[0])]) if r.scenario_id == chosen[0])
    assert (again.xyz == record.xyz).all() and (again.valid == record.valid).all()
    # a second call reuses the folders; another set of input files remakes them
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    assert split_real_scenes(str(source), str(out), verbose=False) == folders
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == stamps
    (source / f"{chosen[-1]}.tfrecord").unlink()
    folders = split_real_scenes(str(source), str(out), verbose=False)
    assert sum(len(list(iter_scenarios(f))) for f in folders.values()) == len(chosen) - 1
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        split_real_scenes(str(empty), str(tmp_path / "none"), verbose=False)


def test_sumo_evaluation_set_takes_one_scenario_per_network(tmp_path):
    config = SumoConfig(warmup_seconds=30.0, record_seconds=20.0)
    summary = make_dataset(tmp_path, 4, seed=5, config=config, per_network=1)
    ids = [r.scenario_id for p in sorted(glob.glob(str(tmp_path / "*.tfrecord"))) for r in read_scenarios(p)]
    assert len(ids) == 4 and len({independent_unit(i) for i in ids}) == 4, ids
    assert summary["per_network"] == 1 and summary["networks"] >= 4
    assert complete_dataset(tmp_path, 4, 5, per_network=1) and not complete_dataset(tmp_path, 4, 5)
