"""Handing scenarios to the rollout actors through a queue, and waiting for them, with bounds.

Scenarios are handed out a few at a time: each actor starts with `per_call` scenarios in each
of `in_flight` calls, and whenever one of its calls finishes (`ray.wait`) it is given the next
ones, so a slow actor takes fewer scenarios instead of setting the step's time.

Every wait has a timeout (`ray.task_timeout_s`): a call that does not answer in time stops the
run with an error naming the actor and its scenarios, instead of hanging. A call whose actor
died beyond its restarts, and a scenario that failed inside an actor, are counted and named, not
scored (with a fixed MPO baseline a zero reward would push the policy away from what it sampled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import ray

from smart_r1.types import RolloutFailure


@dataclass(frozen=True)
class Task:
    """One actor call: its result ref, the actor's index and the scenarios it was given."""

    ref: ray.ObjectRef
    worker: int
    indices: tuple[int, ...]


@dataclass
class RolloutQueue:
    """Scenarios of one request (an RL step, an evaluation) still to hand out, and the calls
    running. `call(worker, indices)` starts one actor call and returns its ref."""

    call: object
    waiting: list[int]
    running: list[Task] = field(default_factory=list)
    per_call: int = 1

    def give(self, worker: int) -> None:
        """Hand `worker` its next scenarios, if any are left."""
        if self.waiting:
            indices, self.waiting = self.waiting[: self.per_call], self.waiting[self.per_call:]
            self.running.append(Task(self.call(worker, indices), worker, tuple(indices)))


def split(indices: list[int], parts: int) -> list[list[int]]:
    """Round-robin shards of indices, one per worker (empty shards dropped)."""
    return [s for s in (indices[i::parts] for i in range(parts)) if s]


def dispatch(workers: list, method: str, indices: list[int], *args, per_call: int = 1,
             in_flight: int = 2, first: int = 0) -> RolloutQueue:
    """Start handing `indices` to `workers`' `method(*lead, shard, spec)` (`args` = lead..., spec):
    `in_flight` calls of up to `per_call` scenarios per actor now, the rest as calls finish
    (`gather`). A call never takes more than an even split of `indices` over the actors, so that
    batching scenarios never leaves an actor idle. The first calls go to actors `first`,
    `first + 1`, ...: learner ranks that dispatch their own shares start on different actors."""
    *lead, spec = args
    per_call = max(1, min(per_call, math.ceil(len(indices) / max(1, len(workers)))))
    queue = RolloutQueue(lambda w, shard: getattr(workers[w], method).remote(*lead, shard, spec),
                         list(indices), per_call=per_call)
    for _ in range(in_flight):
        for i in range(len(workers)):
            queue.give((first + i) % len(workers))
    return queue


def _results(task: Task, timeout_s: float) -> tuple[list, list[str]]:
    try:
        part = ray.get(task.ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise
    except ray.exceptions.RayError as e:  # the actor died beyond its restarts, or the call raised
        text = str(e).splitlines()[0] if str(e) else ""
        return [], [f"rollout worker {task.worker}, scenarios {list(task.indices)}: {type(e).__name__}: {text}"]
    results, failures = [], []
    for r in part:
        if isinstance(r, RolloutFailure):
            failures.append(f"rollout worker {task.worker}, scenario {r.scenario_index} ({r.scenario_id}): "
                            f"{r.error.splitlines()[0]}")
        else:
            results.append(r)
    return results, failures


def gather(queue: RolloutQueue, timeout_s: float, what: str) -> tuple[list, list[str]]:
    """(results of every scenario that succeeded, in the order of the request; one message per
    failed scenario or call). Hands out the queue's remaining scenarios as actors free up.

    Raises TimeoutError naming the actors and scenarios still running when no call has finished
    for `timeout_s`."""
    finished: list[tuple[Task, list]] = []
    failures: list[str] = []
    while queue.running:
        done, _ = ray.wait([t.ref for t in queue.running], num_returns=1, timeout=timeout_s)
        if not done:
            names = "; ".join(f"rollout worker {t.worker} (scenarios {list(t.indices)})" for t in queue.running)
            for t in queue.running:
                ray.cancel(t.ref, force=False)
            raise TimeoutError(f"{what}: no answer within {timeout_s:g} s from {names} (ray.task_timeout_s)")
        task = next(t for t in queue.running if t.ref == done[0])
        queue.running.remove(task)
        queue.give(task.worker)
        results, failed = _results(task, timeout_s)
        finished.append((task, results))
        failures += failed
    finished.sort(key=lambda item: item[0].indices)
    return [r for _, results in finished for r in results], failures
