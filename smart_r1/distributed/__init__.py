"""Ray: moving data, weights and work. The method itself is `smart_r1.rl`.

Modules:
    rollout_worker    rollout actors: sample and score rollouts, return experience or metrics
    worker_kit        what every learner loop uses: its job, rank, resume, progress, reports
    supervised_loop   the BC and CAT-K SFT learner loop
    mpo_loop          the RFT learner loop: dispatch rollouts, collate experience, `mpo_step`, sync
    learner           the Ray Train `TorchTrainer` that runs a stage's loop
    resources         what a run asks of Ray (actors + learners), checked before it starts
    pipeline          the stage DAG BC -> SFT -> RFT -> SFT, data and model preparation, scoring
    sweep_config      the alpha/beta sweep's search space and per-trial pipeline configs
    sweep_results     trial rows, ranking, the sweep table
    sweep             the Ray Tune driver of the sweep
    timing            named phase timers
"""
