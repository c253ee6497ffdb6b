"""Learner loop of the RFT stage (MPO), run by every Ray Train worker.

One RL step:
    rollout   rank 0 waits for the rollout workers' experiences of this step's scenarios
    adv       stale experiences (weights more than `max_staleness` versions old) are dropped,
              failed rollouts are dropped and counted (never scored as zero: with a fixed
              baseline a zero reward would push the policy away from whatever it sampled)
    update    MPO loss (smart_r1.rl.mpo) on this rank's share, gradients averaged over ranks
    sync      one `ray.put` of the new weights, tagged with the next version
With max_staleness >= 1 the next step's rollouts are dispatched before the update (with the
current weights), so the workers sample while the learner updates; the ratio pi / pi_old of
the clipped objective then corrects for the one-version lag.
"""

from __future__ import annotations

import numpy as np
import ray
import torch

from smart_r1.distributed.learner import (
    LearnerJob, Progress, maybe_fail, optimizer_step, report, say, start_training,
)
from smart_r1.distributed.rollout_worker import spec_from_stage, split
from smart_r1.distributed.timing import PhaseTimer, format_phases
from smart_r1.types import Experience, RolloutFailure


def step_scenarios(seed: int, step: int, num_scenarios: int, count: int) -> list[int]:
    """The scenarios of an RL step: a fixed function of (seed, step), so a resumed run repeats it."""
    rng = np.random.default_rng([seed, step])
    return sorted(rng.choice(num_scenarios, size=count, replace=count > num_scenarios).tolist())


def dispatch(workers: list, version: int, weights_ref, indices: list[int], spec) -> list:
    return [w.rollout.remote(version, [weights_ref], "train", shard, spec)
            for w, shard in zip(workers, split(indices, len(workers)))]


def collect(pending: list) -> tuple[list[Experience], int]:
    """Experiences of finished tasks; failed scenarios and failed tasks are counted, not kept."""
    experiences, failed = [], 0
    for ref in pending:
        try:
            results = ray.get(ref)
        except ray.exceptions.RayError as e:
            say(f"[rft] a rollout task failed and is dropped: {type(e).__name__}")
            failed += 1
            continue
        for r in results:
            if isinstance(r, RolloutFailure):
                say(f"[rft] rollout of {r.scenario_id} failed and is dropped: {r.error.splitlines()[0]}")
                failed += 1
            else:
                experiences.append(r)
    return experiences, failed


def _pad(arrays: list[np.ndarray], a: int, axis: int) -> torch.Tensor:
    out = []
    for x in arrays:
        width = [(0, 0)] * x.ndim
        width[axis] = (0, a - x.shape[axis])
        out.append(np.pad(x, width))
    return torch.as_tensor(np.stack(out))


def experience_batch(experiences: list[Experience], scenes: dict, device) -> tuple:
    """Collate experiences with their scenes: batch, tokens [B, R, A, 16], poses [B, R, A, 80, 3],
    old log-probs [B, R, A, 16], rewards [B, R] or [B, R, A]."""
    from smart_r1.tokens.scene import collate

    batch = collate([scenes[e.scenario_index] for e in experiences]).to(device)
    a = batch.agent_mask.shape[1]
    tokens = _pad([e.tokens for e in experiences], a, 1).to(device)
    poses = _pad([e.poses for e in experiences], a, 1).to(device)
    old = _pad([e.log_probs for e in experiences], a, 1).to(device)
    rewards = experiences[0].rewards
    rewards = (_pad([e.rewards for e in experiences], a, 1) if rewards.ndim == 2
               else torch.as_tensor(np.stack([e.rewards for e in experiences]))).to(device)
    return batch, tokens, poses, old, rewards


def mpo_update(model, ref_model, optimizer, stage, batch, tokens, poses, old, rewards, world_size) -> dict:
    """`updates_per_batch` MPO steps on one batch; returns the last step's statistics."""
    from smart_r1.rl.mpo import mpo_loss
    from smart_r1.rollout.closed_loop import token_log_probs

    b, r, a = tokens.shape[:3]
    full = stage.kl_estimator == "full"
    # pi is the policy that sampled: the model's tokens tempered and filtered as the actors drew them
    # (the gradient of the unfiltered log-prob would also move the never-sampled tail; see
    # smart_r1.rl.mpo). The KL with the "full" estimator is between the models' own distributions.
    sampling = dict(top_k=stage.top_k_sampling, temperature=stage.temperature)
    with torch.no_grad():
        ref_out = token_log_probs(ref_model, batch, tokens, poses, full=full, **sampling)
    ref_lp, ref_full = ref_out if full else (ref_out, None)
    live = (batch.sim_mask & batch.agent_mask)[:, None, :, None].expand(b, r, a, tokens.shape[-1])
    flat = lambda x: x.reshape(b * r, *x.shape[2:])  # [B, R, ...] -> [B * R, ...]: rollouts axis
    stats = None
    model.eval()  # no dropout: the log-probs must be those of the policy that sampled (as in RLHF)
    for _ in range(stage.updates_per_batch):
        out = token_log_probs(model, batch, tokens, poses, full=full, **sampling)
        lp, lp_full = out if full else (out, None)
        loss, stats = mpo_loss(
            flat(lp), flat(ref_lp), flat(rewards), flat(live), stage.alpha, stage.beta,
            old_log_probs=flat(old) if stage.updates_per_batch > 1 or stage.max_staleness > 0 else None,
            clip_eps=stage.clip_eps, kl_estimator=stage.kl_estimator,
            full_log_probs=flat(lp_full) if full else None, full_ref_log_probs=flat(ref_full) if full else None)
        grad_norm = optimizer_step(model, optimizer, loss, stage.grad_clip, world_size)
    return {**vars(stats), "grad_norm": grad_norm}


def _share(experiences: list[Experience], rank: int, world_size: int) -> list[Experience]:
    """Rank 0 collected everything; every rank takes its round-robin share."""
    if world_size > 1:
        import torch.distributed as dist

        box = [experiences]
        dist.broadcast_object_list(box, src=0)
        experiences = box[0]
    share = experiences[rank::world_size]
    return share or experiences[:1]  # a rank never idles with an empty batch (keeps all-reduce in step)


def mpo_loop(config: dict) -> None:
    from smart_r1.data.dataset import iter_scenarios
    from smart_r1.model.checkpoint import load_checkpoint
    from smart_r1.tokens.scene import build_scene

    job: LearnerJob = config["job"]
    stage = job.stage
    model, optimizer, device, rank, world_size, start = start_training(job, "step")
    ref_model = load_checkpoint(job.ref_checkpoint or job.init_checkpoint, map_location=device)
    ref_model.requires_grad_(False)
    records = list(iter_scenarios(job.datasets["train"]))
    scenes: dict[int, object] = {}
    spec = spec_from_stage(stage)
    workers = job.rollout_workers
    overlap = stage.max_staleness >= 1
    timer = PhaseTimer()
    progress = Progress(stage.name, stage.steps, start, rank == 0)

    def weights():
        with timer.phase("sync"):  # the one ray.put per update
            return ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})

    version = start
    pending = []
    if rank == 0:
        pending = dispatch(workers, version, weights(), step_scenarios(job.seed, start, len(records),
                                                                        stage.scenarios_per_step), spec)
    for step in range(start, stage.steps):
        maybe_fail(job, step)
        for phase in ("rollout", "sync"):  # every row names every phase (0 s where skipped)
            timer.add(phase, 0.0)
        experiences, failed, stale = [], 0, 0
        if rank == 0:
            with timer.phase("rollout"):
                experiences, failed = collect(pending)
            fresh = [e for e in experiences if version - e.version <= stage.max_staleness]
            stale = len(experiences) - len(fresh)
            experiences = fresh
            if overlap and step + 1 < stage.steps:  # sample the next step while this one updates
                pending = dispatch(workers, version, weights(), step_scenarios(
                    job.seed, step + 1, len(records), stage.scenarios_per_step), spec)
        experiences = _share(experiences, rank, world_size)
        if not experiences:
            raise RuntimeError(f"RL step {step}: every rollout failed or was stale")
        with timer.phase("adv"):
            for e in experiences:
                if e.scenario_index not in scenes:
                    scenes[e.scenario_index] = build_scene(records[e.scenario_index], model.vocab, agents="sim")
            batch = experience_batch(experiences, scenes, device)
        with timer.phase("update"):
            stats = mpo_update(model, ref_model, optimizer, stage, *batch, world_size)
        version += 1
        if rank == 0 and not overlap and step + 1 < stage.steps:
            pending = dispatch(workers, version, weights(), step_scenarios(
                job.seed, step + 1, len(records), stage.scenarios_per_step), spec)
        worker_time = {f"worker_{k}_s": float(np.mean([e.seconds[k] for e in experiences]))
                       for k in ("rollout", "reward")}
        metrics = {
            "step": step, "version": version, **stats, **worker_time, **timer.lap(),
            "reward": float(np.mean([e.rewards.mean() for e in experiences])),
            "realism": float(np.mean([e.realism.mean() for e in experiences])),
            "collision_rate": float(np.mean([e.collision.mean() for e in experiences])),
            "offroad_rate": float(np.mean([e.offroad.mean() for e in experiences])),
            "rollouts_failed": failed, "rollouts_stale": stale, "scenarios": len(experiences),
        }
        progress.line(step + 1, f"reward {metrics['reward']:.3f} realism {metrics['realism']:.3f} "
                                f"coll {metrics['collision_rate']:.3f} off {metrics['offroad_rate']:.3f} "
                                f"kl {stats['kl']:.4f} | {format_phases({k: v for k, v in metrics.items() if k.startswith('time_')})}")
        report(job, model, optimizer, step, metrics, rank)
