"""Handing scenarios to the rollout actors and waiting for their results, with bounds.

Every wait has a timeout (`ray.task_timeout_s`): a task that does not answer in time stops the
run with an error naming the actor and its scenarios, instead of hanging. A task whose actor
died beyond its restarts, and a scenario that failed inside an actor, are counted and named, not
scored (with a fixed MPO baseline a zero reward would push the policy away from what it sampled).
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

from smart_r1.types import RolloutFailure


@dataclass(frozen=True)
class Task:
    """One actor call: its result ref, the actor's index and the scenarios it was given."""

    ref: ray.ObjectRef
    worker: int
    indices: tuple[int, ...]


def split(indices: list[int], parts: int) -> list[list[int]]:
    """Round-robin shards of indices, one per worker (empty shards dropped)."""
    return [s for s in (indices[i::parts] for i in range(parts)) if s]


def dispatch(workers: list, method: str, indices: list[int], *args) -> list[Task]:
    """Call `method(*args[:-1], shard, args[-1])`-style actor methods: `args` are the leading
    arguments, the shard of scenario indices is inserted before the last one (the spec)."""
    *lead, spec = args
    return [Task(getattr(workers[w], method).remote(*lead, shard, spec), w, tuple(shard))
            for w, shard in enumerate(split(indices, len(workers)))]


def gather(tasks: list[Task], timeout_s: float, what: str) -> tuple[list, list[str]]:
    """(results of every scenario that succeeded, one message per failed scenario or task).

    Raises TimeoutError naming the actors and scenarios still running after `timeout_s`."""
    if not tasks:
        return [], []
    ready, waiting = ray.wait([t.ref for t in tasks], num_returns=len(tasks), timeout=timeout_s)
    if waiting:
        late = [t for t in tasks if t.ref in set(waiting)]
        for t in late:
            ray.cancel(t.ref, force=False)
        names = "; ".join(f"rollout worker {t.worker} (scenarios {list(t.indices)})" for t in late)
        raise TimeoutError(f"{what}: no answer within {timeout_s:g} s from {names} (ray.task_timeout_s)")
    results, failures = [], []
    for t in tasks:
        try:
            part = ray.get(t.ref, timeout=timeout_s)
        except ray.exceptions.RayError as e:  # the actor died beyond its restarts, or the task raised
            failures.append(f"rollout worker {t.worker}, scenarios {list(t.indices)}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        for r in part:
            if isinstance(r, RolloutFailure):
                failures.append(f"rollout worker {t.worker}, scenario {r.scenario_index} ({r.scenario_id}): "
                                f"{r.error.splitlines()[0]}")
            else:
                results.append(r)
    return results, failures
