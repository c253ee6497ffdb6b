"""Rendering scenarios and rollouts (matplotlib, Agg backend: files only, no display needed).

Modules:
    render    `render_scenario(record, states, out_path)` -> PNG still or animated GIF
    signals   per-step collision / off-road flags used for highlighting
"""
