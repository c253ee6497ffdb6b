"""Rollout work goes through a queue, so a slow actor takes fewer scenarios; waiting on actors is
bounded: a call that never answers stops the run with an error naming the actor and its
scenarios; an actor that keeps dying ends, after its bounded restarts, as a named failure."""

from __future__ import annotations

import os
import sys
import time

import pytest
import ray

from smart_r1.distributed.rollout_tasks import dispatch, gather
from smart_r1.ray_runtime import ensure_ray
from smart_r1.types import RolloutFailure


class Misbehaving:
    """An actor with the rollout actors' calling convention: (version, weights, dataset, indices, spec)."""

    def __init__(self, seconds_per_scenario: float = 0.0):
        self.delay = seconds_per_scenario

    def rollout(self, version, weights, dataset, indices, spec):
        time.sleep(self.delay * len(indices))
        if spec == "hang" and 7 in indices:
            time.sleep(3600)
        if spec == "die" and 7 in indices:
            os._exit(1)  # the process dies: Ray restarts the actor and retries, a bounded number of times
        if spec == "tag":  # which actor did the work
            return [(i, self.delay) for i in indices]
        return [RolloutFailure(i, f"s{i}", "ValueError: bad scenario") if i == 3 else i for i in indices]


# The workers cannot import this test module: ship its classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def workers():
    """Two fresh actors per test (a hung one stays busy until killed)."""
    ensure_ray(num_cpus=2)
    actor = ray.remote(Misbehaving).options(num_cpus=0.1, max_restarts=1, max_task_retries=1)
    handles = [actor.remote() for _ in range(2)]
    yield handles
    for h in handles:
        ray.kill(h, no_restart=True)


def test_results_and_failed_scenarios_are_named(workers):
    results, failures = gather(dispatch(workers, "rollout", [0, 1, 2, 3], 0, [], "train", "ok"), 60, "test")
    assert sorted(results) == [0, 1, 2]
    assert len(failures) == 1 and "scenario 3 (s3)" in failures[0] and "rollout worker 1" in failures[0]


def test_batched_calls_split_evenly_and_ranks_start_on_different_actors(workers):
    # up to 4 scenarios a call, but never more than an even split (3 of 5 over 2 actors); a rank
    # that starts on actor 1 hands it its first call
    queue = dispatch(workers, "rollout", [0, 1, 2, 4, 5], 0, [], "train", "ok", per_call=4, first=1)
    assert [(t.worker, t.indices) for t in queue.running] == [(1, (0, 1, 2)), (0, (4, 5))]
    results, failures = gather(queue, 60, "test")
    assert results == [0, 1, 2, 4, 5] and not failures


def test_a_task_that_never_answers_times_out_with_its_actor_and_scenarios(workers):
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"rollout worker 1 \(scenarios \[7\]\)"):
        gather(dispatch(workers, "rollout", [4, 5, 6, 7], 0, [], "train", "hang"), 3, "RL step")
    assert time.perf_counter() - start < 30


def test_an_actor_that_keeps_dying_is_a_named_failure(workers):
    results, failures = gather(dispatch(workers, "rollout", [6, 7], 0, [], "train", "die"), 120, "RL step")
    assert results == [6]
    assert len(failures) == 1 and "rollout worker 1, scenarios [7]" in failures[0]


def test_a_slow_actor_takes_fewer_scenarios():
    ensure_ray(num_cpus=2)
    actor = ray.remote(Misbehaving).options(num_cpus=0.1)
    fast, slow = actor.remote(0.05), actor.remote(2.0)
    results, failures = gather(dispatch([fast, slow], "rollout", list(range(12)), 0, [], "train", "tag"), 60, "test")
    assert not failures and [i for i, _ in results] == list(range(12)), "all, in the order of the request"
    by_slow = sum(1 for _, delay in results if delay == 2.0)
    assert by_slow <= 3, f"the slow actor took {by_slow} of 12 scenarios (fixed shards would give it 6)"
    for h in (fast, slow):
        ray.kill(h, no_restart=True)
