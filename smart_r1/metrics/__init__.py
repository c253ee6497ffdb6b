"""WOSAC 2025 sim-agents metrics: a batched PyTorch re-implementation (for rewards and reports) and
a wrapper around Waymo's official TensorFlow evaluator (for final reports and agreement tests).

Modules, in data order:
    rollouts_io            simulated states [R, S, 80, 4] <-> `ScenarioRollouts` protos, log replay
    context                logged scenario data as padded tensors (MetricContext)
    polylines              map polylines as segment sets, exact pruned nearest-segment search
    features_kinematic     speeds and accelerations (central differences)
    features_interaction   distance to nearest object (rounded boxes), time to collision
    features_map           distance to road edge, red-light violations
    features               all features of logged or simulated trajectories (MetricFeatures)
    estimators             histogram / Bernoulli log-likelihoods from the official config
    wosac                  scoring, per-scenario and batched metrics
    leaderboard            dataset aggregation (the one), WOSAC bucket scores, the leaderboard row
    tables                 markdown tables of metrics (pipeline, sweep, CLI)
    intervals              bootstrap intervals over scenarios (and seeds), paired stage
                           differences, the pipeline's score files, the multi-seed report
    signals                per-rollout / per-agent RL signals (collision, off-road, realism),
                           per-step event flags for drawing
    official               the official evaluator, with the 2025 config, serial or over Ray tasks
    fields                 the `SimAgentMetrics` field names
    compiled               opt-in torch.compile of the hot kernels (`enable_compile()`)

`official` is not imported here: it loads TensorFlow on use.
"""

from smart_r1.metrics.compiled import enable_compile
from smart_r1.metrics.fields import FEATURE_NAMES, LIKELIHOOD_FIELDS, METRIC_FIELDS
from smart_r1.metrics.rollouts_io import (
    log_replay_states, scenario_rollouts_to_states, states_to_scenario_rollouts,
)
from smart_r1.metrics.signals import RolloutSignals, StepEvents, rollout_signals, step_events
from smart_r1.metrics.leaderboard import aggregate_metrics
from smart_r1.metrics.intervals import Interval, bootstrap_ci, paired_difference, seed_bootstrap
from smart_r1.metrics.wosac import compute_metrics_batch, compute_scenario_metrics

__all__ = [
    "FEATURE_NAMES", "Interval", "LIKELIHOOD_FIELDS", "METRIC_FIELDS", "RolloutSignals", "StepEvents", "aggregate_metrics",
    "compute_metrics_batch", "enable_compile", "compute_scenario_metrics", "log_replay_states", "rollout_signals",
    "scenario_rollouts_to_states", "seed_bootstrap", "states_to_scenario_rollouts", "step_events",
    "bootstrap_ci", "paired_difference",
]
