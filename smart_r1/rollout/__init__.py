"""Closed-loop simulation with SMART-tiny: token selectors (sampling, CAT-K), batched rollouts,
and a trained policy loaded for rollouts (`policy`)."""
