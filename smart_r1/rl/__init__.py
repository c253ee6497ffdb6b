"""Training objectives: BC, CAT-K closed-loop SFT targets, rewards and the MPO loss."""
