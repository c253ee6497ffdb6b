"""Model-free reference policies scored like a simulator: the logged future (log replay, the
ceiling), every agent standing still (stationary) and constant velocity (`metrics.rollouts_io`).

A learnt policy's realism means something only beside these. On the real WOMD scenes of
../shared a simulation that never moves scores 0.68 realism meta (log replay 0.78): WOSAC's
metametric weighs collisions and off-road heavily and a parked agent commits neither, so RFT can
raise realism by slowing agents down (the travel ratio, `signals.travel_ratio`, shows it).
The policies are deterministic, so one rollout per scenario gives their metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

from smart_r1.metrics.leaderboard import aggregate_metrics, with_categories
from smart_r1.metrics.rollouts_io import constant_velocity_states, log_replay_states, stationary_states
from smart_r1.metrics.signals import mean_travel_ratio, travel_ratio
from smart_r1.metrics.wosac import compute_metrics_batch
from smart_r1.types import ScenarioRecord

POLICIES = {"log replay": log_replay_states, "stationary": stationary_states,
            "constant velocity": constant_velocity_states}


def reference_scores(records: Sequence[ScenarioRecord], policies: Sequence[str] = tuple(POLICIES)
                     ) -> dict[str, list[dict]]:
    """{policy: per-scenario records} ({'scenario_id', SimAgentMetrics fields, categories,
    'travel_ratio'}) of each reference policy on the records that have sim agents."""
    records = [r for r in records if r.sim_agent_mask.any()]
    out = {}
    for name in policies:
        states = [POLICIES[name](r, 1) for r in records]
        out[name] = [{"scenario_id": r.scenario_id, **with_categories(m), "travel_ratio": travel_ratio(r, s)}
                     for r, s, m in zip(records, states, compute_metrics_batch(records, states))]
    return out


def summary(scored: list[dict]) -> dict:
    """A data set's metrics of per-scenario records, with the mean travel ratio."""
    return {**aggregate_metrics([{k: v for k, v in r.items() if k not in ("scenario_id", "travel_ratio")}
                                 for r in scored]),
            "travel_ratio": mean_travel_ratio(scored), "scenarios": len(scored)}
