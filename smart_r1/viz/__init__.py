"""Rendering scenarios and rollouts (matplotlib, Agg backend: files only, no display needed).

    render    `render_scenario(record, states, out_path)` -> PNG still or animated GIF, with
              collision / off-road moments from the fast WOSAC features
"""
