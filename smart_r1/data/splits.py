"""Fixed train / tune / report splits of real WOMD scenes, by a hash of the scene's id.

A scenario goes to the split its *scene* hashes to: the scenario id without a window suffix
(`<id>_w<k>`: 9.1 s windows cut from one 20 s recording are one scene and must never straddle two
splits). The hash is SHA-256 of a fixed salt and that id, read as a number in [0, 1):

    [0.0, 0.5)  train     learn from it
    [0.5, 0.7)  tune      choose settings on it
    [0.7, 1.0)  report    only ever read to write the tables

so a scene's split depends on its id alone: adding scenes never moves old ones, and any copy of
the same scene (another source, another file) lands in the same split.

`split_real_scenes` routes the records of a folder of TFRecords (a local folder or a URI) into one
Parquet folder per split under the run's storage root, streaming: it holds at most one shard's
worth of records per split, never the whole set.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from smart_r1.data.dataset import expand_inputs
from smart_r1.data.parquet import write_shard
from smart_r1.data.womd import read_scenarios
from smart_r1.storage import display, exists, join, read_json, remove_tree, write_json
from smart_r1.types import ScenarioRecord

SPLITS = ("train", "tune", "report")
BOUNDS = (0.5, 0.7)  # upper ends of train and tune in the hash's [0, 1)
SALT = "smart-r1/real-split/v1"  # changing it reshuffles every split: never do so
SHARD_SCENARIOS = 256  # records per written shard (a few row groups)
SPLIT_FILE = "split.json"  # beside the split folders: the inputs they were made from, written last
_WINDOW = re.compile(r"_w\d+$")


def scene_id(scenario_id: str) -> str:
    """The recorded scene a scenario comes from: its id without a `_w<k>` window suffix."""
    return _WINDOW.sub("", scenario_id)


def split_of(scenario_id: str) -> str:
    """"train", "tune" or "report": where the scenario's scene hashes to."""
    digest = hashlib.sha256(f"{SALT}:{scene_id(scenario_id)}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return SPLITS[sum(u >= b for b in BOUNDS)]


def split_counts(scenario_ids: Iterable[str]) -> dict[str, int]:
    counts = dict.fromkeys(SPLITS, 0)
    for sid in scenario_ids:
        counts[split_of(sid)] += 1
    return counts


def split_real_scenes(source: str, out: str, verbose: bool = True) -> dict[str, str]:
    """Parquet folders `<out>/<split>` of the scenarios in `source` (a folder of TFRecords, a glob
    or a URI), by `split_of`; returns {split: folder} for the non-empty splits.

    Reused when `<out>/split.json` names the same input files and split rule (it is written after
    every shard); otherwise the folders are made again. Raises ValueError when `source` holds no
    scenario."""
    files = expand_inputs(source if any(c in source for c in "*?") or ".tfrecord" in source
                          else join(source, "*.tfrecord*"))
    wanted = {"files": [display(f).rsplit("/", 1)[-1] for f in files], "salt": SALT, "bounds": list(BOUNDS)}
    made = read_json(join(out, SPLIT_FILE), None)
    if made is not None and {k: made.get(k) for k in wanted} == wanted:
        return {s: join(out, s) for s in SPLITS if made["counts"][s]}
    remove_tree(out)
    pending: dict[str, list[ScenarioRecord]] = {s: [] for s in SPLITS}
    shards = dict.fromkeys(SPLITS, 0)
    counts = dict.fromkeys(SPLITS, 0)

    def flush(split: str) -> None:
        if pending[split]:
            write_shard(join(out, split, f"real-{shards[split]:05d}.parquet"), pending[split])
            shards[split] += 1
            pending[split] = []

    for path in files:
        for record in read_scenarios(path):
            split = split_of(record.scenario_id)
            pending[split].append(record)
            counts[split] += 1
            if len(pending[split]) >= SHARD_SCENARIOS:
                flush(split)
    for split in SPLITS:
        flush(split)
    if not sum(counts.values()):
        raise ValueError(f"data.real: {display(source)} holds no scenarios")
    write_json(join(out, SPLIT_FILE), {**wanted, "counts": counts})
    if verbose:
        print(f"[data] real WOMD scenes of {display(source)}: " + ", ".join(f"{counts[s]} {s}" for s in SPLITS)
              + f" (split by a hash of the scene id) -> {display(out)}", flush=True)
    return {s: join(out, s) for s in SPLITS if counts[s]}


def has_split(out: str) -> bool:
    return exists(join(out, SPLIT_FILE))


_SUMO_ID = re.compile(r"^(sumo-\d+-\d+)-\d+-\d+$")  # sumo-<seed>-<network>-<window start>-<sdc>


def independent_unit(scenario_id: str) -> str:
    """What a scenario is an independent draw of, for intervals: a generated SUMO scenario's
    network (its windows and self-driving cars share the network's traffic), a real scenario's
    recorded scene (its windows share the recording)."""
    sumo = _SUMO_ID.match(scenario_id)
    return sumo.group(1) if sumo else scene_id(scenario_id)
