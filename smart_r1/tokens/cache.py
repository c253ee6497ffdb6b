"""Tokenise once: the training shards as token shards, a cached step keyed by what the scenes
depend on, run before training so that no learner tokenises.

A scene (`build_scene`) depends on the record, the motion vocabulary and the options a stage
asks for (`SceneOptions`: "all" agents up to 64 for BC, the "sim" agents up to 128 for closed-loop
SFT). Token shards live at

    <root>/tokens/<vocab hash>/<data set>/<options>/<source shard name>.parquet   (smart_r1.tokens.shards)
    <root>/tokens/<vocab hash>/<data set>/<options>/done.json        written last: source, counts

one token shard per scenario shard, made by parallel Ray tasks (one per source shard), each
written whole or not at all; a re-run skips finished token shards, and a folder with its
`done.json` is reused as is. A record the options leave nothing of (no sim agent, for "sim") has
no row: the scene stream never draws it (as the learner's old in-memory filter did).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from smart_r1.data.parquet import read_shard, shard_paths
from smart_r1.storage import base_name, display, exists, join, write_json
from smart_r1.tokens.motion_vocab import MotionVocab
from smart_r1.tokens.scene import build_scene
from smart_r1.tokens.shards import write_token_shard

TOKEN_FORMAT = 1  # bump when build_scene's output changes: old token folders are then not reused
DONE_NAME = "done.json"


@dataclass(frozen=True)
class SceneOptions:
    """The build_scene options a stage trains on: agents "all" or "sim", at most max_agents."""

    agents: str
    max_agents: int

    @property
    def name(self) -> str:
        return f"v{TOKEN_FORMAT}-{self.agents}{self.max_agents}"

    def keeps(self, record) -> bool:
        """Whether the record gives a scene to train on: closed-loop SFT needs a sim agent."""
        return self.agents == "all" or bool(record.sim_agent_mask.any())


# BC learns from every agent with tokens; closed-loop SFT unrolls the sim agents.
STAGE_OPTIONS = {"bc": SceneOptions("all", 64), "catk_sft": SceneOptions("sim", 128)}


def vocab_hash(vocab: MotionVocab) -> str:
    """16 hex digits of the SHA-256 of the vocabulary's contours (float32, shape and values)."""
    contours = vocab.contours.detach().cpu().float().contiguous()
    digest = hashlib.sha256(str(tuple(contours.shape)).encode())
    digest.update(contours.numpy().tobytes())
    return digest.hexdigest()[:16]


def token_folder(root: str, vocab: MotionVocab, options: SceneOptions, dataset: str = "train") -> str:
    """Where the token shards of data set `dataset` (its name in the run: "train", "real_train", ...)
    for `options` live under `root`."""
    return join(root, "tokens", vocab_hash(vocab), dataset, options.name)


def tokenize_shard(source: str, target: str, vocab: MotionVocab, options: SceneOptions) -> dict:
    """One scenario shard -> one token shard (skipped when `target` exists). Returns
    {"shard", "scenes", "records", "skipped"}."""
    if exists(target):
        return {"shard": base_name(target), "scenes": None, "records": None, "skipped": True}
    scenes, records = [], 0
    for record in read_shard(source):  # one row group at a time
        records += 1
        if options.keeps(record):
            scenes.append(build_scene(record, vocab, agents=options.agents, max_agents=options.max_agents))
    write_token_shard(target, scenes)
    return {"shard": base_name(target), "scenes": len(scenes), "records": records, "skipped": False}


def _tokenize_task(source: str, targets: list[str], vocab: dict, options: list[SceneOptions]) -> list[dict]:
    """Ray task: one source shard into each missing token shard of `options` (read once each)."""
    vocab_ = MotionVocab.from_dict(vocab)
    return [tokenize_shard(source, t, vocab_, o) for t, o in zip(targets, options)]


def mark_done(folder: str, data: str, vocab: MotionVocab, options: SceneOptions, sources: list[str],
              seconds: float = 0.0) -> None:
    """Write the folder's done.json (after all its token shards): what it was made from."""
    write_json(join(folder, DONE_NAME), {"source": display(data), "vocab": vocab_hash(vocab), "options": asdict(options),
                                         "shards": [base_name(s) for s in sources], "seconds": round(seconds, 3)})


def tokenize_dataset(data: str, root: str, vocab: MotionVocab, options: list[SceneOptions],
                     verbose: bool = True, dataset: str = "train") -> dict[SceneOptions, str]:
    """Token shards of the Parquet data `data` (the run's data set `dataset`) for each of
    `options`, under `root` (the run's storage root, local or URI); returns {options: token
    folder}. Runs on the Ray this process has joined, one task (1 CPU) per source shard; prints
    one line per finished shard."""
    folders = {o: token_folder(root, vocab, o, dataset) for o in dict.fromkeys(options)}
    todo = [o for o, folder in folders.items() if not exists(join(folder, DONE_NAME))]
    if not todo:
        return folders
    sources = [str(s) for s in shard_paths(data)]
    if not sources:
        raise FileNotFoundError(f"{display(data)} holds no .parquet shards to tokenise")
    started = time.perf_counter()
    # max_calls=1: each task's process exits after its shard, so no tokenising worker's memory
    # lingers in (or is reused for) a learner or a rollout actor
    # placement_group=None: called inside a placement group (a Tune trial's), the tasks would be
    # captured into its bundles, which have no room for them
    task = ray.remote(num_cpus=1, max_calls=1,
                      scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))(_tokenize_task)
    vocab_ref = ray.put(vocab.to_dict())
    pending = {task.remote(s, [join(folders[o], base_name(s)) for o in todo], vocab_ref, todo): s for s in sources}
    names = ", ".join(o.name for o in todo)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        source = pending.pop(done[0])
        results = ray.get(done[0])
        if verbose:
            elapsed = time.perf_counter() - started
            left = elapsed / (len(sources) - len(pending)) * len(pending)
            state = "skipped (done before)" if all(r["skipped"] for r in results) else \
                ", ".join(f"{r['scenes']} scenes" for r in results)
            print(f"[tokens] {dataset} {len(sources) - len(pending)}/{len(sources)} {base_name(source)} ({names}): {state} "
                  f"| elapsed {elapsed:.0f}s eta {left:.0f}s", flush=True)
    for o in todo:  # done.json last: the folder is complete
        mark_done(folders[o], data, vocab, o, sources, time.perf_counter() - started)
    return folders

