"""The method, runnable without Ray: the BC and CAT-K SFT losses, rewards from WOSAC signals,
experience batches, the MPO loss and step, the optimiser step and schedules.

Modules:
    bc           next-token cross-entropy on logged data; standalone BC training
    catk         CAT-K closed-loop SFT targets and loss
    rewards      rewards on the metric's [0, 1] scale from the fast WOSAC signals
    experience   rollouts scored into `Experience` (actor side), collated into `ExperienceBatch`
    mpo          the MPO loss (eqs. MPO-1..3) and `mpo_step`: experience -> loss -> update
    optim        AdamW, warm-up / cosine schedule, the optimiser step (gradients averaged across learners)
"""
