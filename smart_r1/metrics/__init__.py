"""WOSAC 2025 sim-agents metrics: a batched PyTorch re-implementation (for rewards and reports) and
a wrapper around Waymo's official TensorFlow evaluator (for final reports and agreement tests).

Modules, in data order:
    rollouts_io          simulated states [R, S, 80, 4] <-> `ScenarioRollouts` protos, log replay
    official             the official evaluator, with the 2025 config, serial or over Ray tasks
    fields               the `SimAgentMetrics` field names
"""
