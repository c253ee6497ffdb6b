"""Closed-loop simulation with SMART-tiny: token selectors (sampling, CAT-K) and batched rollouts."""
