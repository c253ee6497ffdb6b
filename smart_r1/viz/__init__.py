"""Rendering scenarios and rollouts (matplotlib, Agg backend: files only, no display needed).

    render    `render_scenario(record, states, out_path, events=...)` -> PNG still or animated GIF;
              it draws what it is given (the collision / off-road flags come from
              `smart_r1.metrics.step_events`)
"""
