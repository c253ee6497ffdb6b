"""Ray: rollout actors, the Ray Train learner, weight sync and Tune sweeps."""
