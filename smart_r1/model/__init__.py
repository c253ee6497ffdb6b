"""SMART-tiny: relative-pose attention layers, map encoder, agent decoder, config, checkpoints."""
