"""Learner loop of the RFT stage (MPO), run by every Ray Train worker. It moves data and weights;
the method is `smart_r1.rl.mpo.mpo_step`.

One RL step (every learner rank runs all of it, on its own share of the step's scenarios):
    rollout   the step's scenarios are a fixed function of (seed, step); rank r takes every
              world_size-th from r and hands them to the rollout workers through a queue (a free
              actor takes the next scenarios), with its own `ray.put` of the weights (identical on
              every rank: gradients are all-reduced), and waits for their experiences
    adv       stale experiences (weights more than `max_staleness` versions old) are dropped,
              failed rollouts are dropped and counted (never scored as zero: with a fixed
              baseline a zero reward would push the policy away from whatever it sampled);
              the rest are collated into one `ExperienceBatch`. What every rank must decide
              alike is decided from counts summed over the ranks (one all-reduce): when fewer
              than `min_rollout_fraction` of the step's scenarios are usable, or a rank has none
              (it could not take part in the update), every rank samples its share again, once,
              then the stage stops with the failures named (every wait is bounded by
              `ray.task_timeout_s`); `alpha: auto` and the logged means are over all ranks'
              experiences
    update    `mpo_step` on this rank's share, gradients averaged over ranks
    sync      one `ray.put` of the new weights per rank, tagged with the next version
With max_staleness >= 1 the next step's rollouts are dispatched before the update (with the
current weights), so the workers sample while the learner updates; `mpo_step` then applies the
clipped ratio surrogate, which corrects for the one-version lag. Rank 0 logs which scenarios each
rank sampled, their mean rewards and a digest of each rank's weights after the update to
`<stage_dir>/rollouts.jsonl` (the ranks' weights must stay identical).

Numerics. The actors send log pi_old (their sampler's, KV-cached) and, with the k3 KL, log pi_ref
(a full forward, as the update's); the update computes log pi in the learner's numerics
(`precision.numerics`: dtype and device). The clipped ratio and the k3 KL mix them, so an actor's
rounding would read as a policy change. Hence: the actors compute log pi_ref only when their
numerics are the learner's (keeping the learner that forward pass: BENCHMARKS.md, "Training
throughput"), else the learner does; and whenever the clipped objective applies to rollouts of
other numerics, the learner recomputes log pi_old with the weights that sampled them
(`learner_log_probs`; it keeps the last `max_staleness` versions' weights for that). Measured on
CPU (bench_step0_numerics.py): at equal numerics the sampler's log pi_old is within 7e-6 (mean
|log ratio|, bfloat16) of the learner's full forward, between float32 and bfloat16 within 6.6e-3
(0.18 for single tokens: most of clip_eps 0.2), a k3 KL of 1e-4 where 0 is exact. At the first
step of a run the policy is the one that sampled (and, in a fresh stage, the reference): the
actors' log-probs are checked against the learner's (`check_agreement`), logged, and the stage
stops when they are far apart (another policy or sampling config than the learner's, or a
precision too coarse). Figures: BENCHMARKS.md, "Actors' and learners' log-probs".
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math

import numpy as np
import ray
import torch
import torch.distributed as dist

from smart_r1.distributed import rollout_tasks
from smart_r1.distributed.rollout_tasks import RolloutQueue
from smart_r1.distributed.rollout_worker import RolloutSpec
from smart_r1.distributed.timing import PhaseTimer, format_phases
from smart_r1.distributed.worker_kit import (LearnerJob, Progress, fetch_checkpoint, maybe_fail, peak_rss_mb, report,
                                            say, start_training)
from smart_r1.config import SamplingConfig
from smart_r1.model.checkpoint import load_checkpoint
from smart_r1.model.precision import numerics
from smart_r1.rl.experience import ExperienceBatch, collate_experiences
from smart_r1.rl.mpo import kl_per_token, mpo_step
from smart_r1.rollout.closed_loop import token_log_probs
from smart_r1.rl.optim import NonFiniteGuard
from smart_r1.storage import join, read_json, truncate_log, write_json, write_log_row
from smart_r1.types import Experience

ALPHA_FILE = "alpha.json"  # alpha: auto, as calibrated
ROLLOUTS_LOG = "rollouts.jsonl"  # per RL step: each rank's scenarios, their rewards, its weights' digest
# How far the actors' log-probs may be from the learner's at the first step of a run (means over
# the sampled tokens): |mean ratio - 1|, and the k3 KLs to pi_old and to pi_ref. Measured between
# float32 and bfloat16 actors and learners on CPU (bench_step0_numerics.py, BENCHMARKS.md): at most
# 2.6e-3 and 1.0e-4; 20 and 50 times that leaves room for GPU kernels and larger models, and stays
# 15 to 70 times below the KLs of actors that sample with another config or other weights.
RATIO_TOL = 0.05
KL_TOL = 5e-3


def step_scenarios(seed: int, step: int, num_scenarios: int, count: int) -> list[int]:
    """The scenarios of an RL step: a fixed function of (seed, step), so a resumed run repeats it."""
    rng = np.random.default_rng([seed, step])
    return sorted(rng.choice(num_scenarios, size=count, replace=count > num_scenarios).tolist())


def step_sampling_seed(seed: int, step: int, attempt: int = 0) -> int:
    """`RolloutSpec.seed` of an RL step's rollouts (attempt 1: the step sampled again). The actors
    reseed per closed-loop batch from it and the batch's first scenario, so a scenario's draws depend
    on (run seed, step, attempt, scenario) alone, not on which actor took it or what that actor
    sampled before: a run, or a resumed one, repeats itself. (A scenario drawn twice in one step,
    when scenarios_per_step exceeds the data set, gets the same draws twice.)"""
    return int(np.random.SeedSequence([seed, step, attempt]).generate_state(1)[0])


def dispatch(workers: list, version: int, weights_ref, indices: list[int], spec: RolloutSpec,
             first: int = 0) -> RolloutQueue:
    """Hand `indices` to the rollout actors, up to `spec.scenes_per_batch` per call, first to actor `first`."""
    return rollout_tasks.dispatch(workers, "rollout", indices, version, [weights_ref], spec.dataset, spec,
                                  per_call=spec.scenes_per_batch, first=first)


def collect(queue: RolloutQueue, timeout_s: float) -> tuple[list[Experience], int]:
    """Experiences of the queue's scenarios; failed scenarios and calls are counted and named, not kept."""
    experiences, failures = rollout_tasks.gather(queue, timeout_s, "RL step rollouts")
    for message in failures:
        say(f"[rft] dropped: {message}")
    return experiences, len(failures)


# What one rank's experiences add to the step's totals (summed over ranks in one all-reduce):
# counts for the decisions every rank must take alike, sums for the means logged over all ranks.
TOTALS = ("usable", "failed", "stale", "empty_ranks", "reward", "realism", "collision_rate", "offroad_rate",
          "worker_rollout_s", "worker_reward_s", "worker_reference_s")


def step_totals(experiences: list[Experience], failed: int, stale: int, device, world_size: int) -> dict[str, float]:
    """TOTALS summed over all learner ranks: the same on every rank. Means are per scenario."""
    per_scenario = [(e.rewards.mean(), e.realism.mean(), e.collision.mean(), e.offroad.mean(),
                     e.seconds.get("rollout", 0.0), e.seconds.get("reward", 0.0), e.seconds.get("reference", 0.0))
                    for e in experiences]
    sums = np.sum(per_scenario, 0) if per_scenario else np.zeros(7)
    values = torch.tensor([len(experiences), failed, stale, float(not experiences), *sums], dtype=torch.float64,
                          device=device)  # on the learner's device: NCCL reduces CUDA tensors only
    if world_size > 1:
        dist.all_reduce(values)
    return dict(zip(TOTALS, values.tolist()))


def calibrated_alpha(job: LearnerJob, mean_reward: float, scenarios: int, rank: int, world_size: int,
                     device) -> float:
    """`alpha: auto`: the mean reward of the starting policy's first batch (over all ranks'
    scenarios), fixed for the rest of the stage and recorded in `<stage_dir>/alpha.json`, which
    a resumed stage reads back (rank 0 reads and writes it, and tells the other ranks)."""
    path = join(job.stage_dir, ALPHA_FILE)  # the stage's folder in the run's storage (local or URI)
    box = torch.zeros(1, dtype=torch.float64, device=device)
    if rank == 0:
        recorded = read_json(path, None)
        if recorded is not None:
            box[0] = float(recorded["alpha"])
        else:
            box[0] = mean_reward
            write_json(path, {"alpha": mean_reward, "from_scenarios": scenarios, "auto": True})
            say(f"[{job.stage.name}] alpha: auto = {mean_reward:.4f} (the starting policy's mean reward on "
                f"{scenarios} scenarios), fixed from here on")
    if world_size > 1:
        dist.broadcast(box, src=0)
    return float(box[0])


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters and buffers, in state-dict order: equal on ranks whose
    weights are bitwise equal."""
    digest = hashlib.sha256()
    for name, value in getattr(model, "module", model).state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def log_ranks(job: LearnerJob, step: int, row: dict, rank: int, world_size: int) -> None:
    """Rank 0 writes every rank's row (plain values, gathered) to `<stage_dir>/rollouts.jsonl`."""
    rows = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    if rank == 0:
        write_log_row(join(job.stage_dir, ROLLOUTS_LOG), {"progress": step, "ranks": rows})


def learner_log_probs(model: torch.nn.Module, batch: ExperienceBatch, sampling: SamplingConfig,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
    """log pi [B, R, A, 16] of the batch's sampled tokens under `model`, computed as the update
    computes them (`token_log_probs` in eval mode, each scene on its own agents), without
    gradients; scenes not in `rows` (bool [B], default all) are left at 0."""
    core = getattr(model, "module", model)
    core.eval()
    out = torch.zeros_like(batch.old_log_probs)
    with torch.no_grad():
        for i, part in enumerate(batch.per_scene()):
            if rows is None or rows[i]:
                lp = token_log_probs(core, part.scenes, part.tokens, part.poses, **dataclasses.asdict(sampling))
                out[i:i + 1, :, :lp.shape[2]] = lp.float()  # [1, R, A_i, 16]
    return out


def check_agreement(learner: torch.Tensor, batch: ExperienceBatch, with_reference: bool) -> dict[str, float]:
    """How the actors' log-probs of a batch compare with the learner's own, `learner` [B, R, A, 16],
    at the first step of a run (the policy is the one that sampled; with_reference: also the
    reference), over the sampled tokens: the mean ratio exp(log pi - log pi_old), the k3 estimate
    of KL(pi_old || pi) from the same samples (mean of ratio - 1 - log ratio: the mean ratio alone
    stays near 1 for any pi close in support, since E_pi_old[pi / pi_old] = 1) and, when the actors
    sent log pi_ref and with_reference, the mean k3 KL(pi || pi_ref). At those weights they are 1,
    0 and 0 up to the numerics."""
    live = batch.live
    log_ratio = (learner - batch.old_log_probs)[live].double()
    found = {"check_ratio": float(log_ratio.exp().mean()), "check_kl_old": float((log_ratio.exp() - 1 - log_ratio).mean())}
    if with_reference and batch.ref_log_probs is not None:
        found["check_kl"] = float(kl_per_token(learner, batch.ref_log_probs)[live].double().mean())
    return found


def in_learner_numerics(batch: ExperienceBatch, sources: set[str], own: str, version: int, stage,
                        model_at, current: torch.Tensor | None = None) -> ExperienceBatch:
    """The batch as the update needs it when some of its rollouts come from actors computing in
    other numerics than the learner's `own` (`sources`: theirs): without their log pi_ref (mpo_step
    runs the reference here) and, when the clipped objective applies (the batch is reused, or holds
    rollouts of versions other than `version`), with log pi_old recomputed here under the weights
    that sampled each scene (`model_at(v)`; `current`: this version's log pi, when known). A batch
    of the learner's own numerics is returned as it is."""
    if sources <= {own}:
        return batch
    batch = dataclasses.replace(batch, ref_log_probs=None)
    if stage.updates_per_batch > 1 or bool((batch.versions != version).any()):
        old = torch.zeros_like(batch.old_log_probs)
        for v in batch.versions.unique().tolist():
            rows = batch.versions == v
            lp = current if v == version and current is not None else \
                learner_log_probs(model_at(v), batch, stage.sampling, rows)
            old[rows] = lp[rows]
        batch = dataclasses.replace(batch, old_log_probs=old)
    return batch


def agreement_problem(found: dict[str, float], actors: str, learner: str) -> str | None:
    """Why the actors' log-probs are too far from the learner's (check_agreement's figures), or None."""
    ratio, kl_old, kl = found["check_ratio"], found["check_kl_old"], found.get("check_kl", 0.0)
    if abs(ratio - 1) <= RATIO_TOL and kl_old <= KL_TOL and kl <= KL_TOL:
        return None
    return (f"at the first RL step the rollout actors' log-probs of their own samples are far from the learner's: "
            f"mean ratio pi/pi_old {ratio:.4f} (expected 1 +- {RATIO_TOL}), k3 KL(pi_old || pi) {kl_old:.3g} and "
            f"KL(pi || pi_ref) {kl:.3g} (expected < {KL_TOL}); actors compute in {actors}, the learner in {learner}. "
            "At these weights all are the same "
            "policy: the actors hold other weights, sample with another config (top_k, top_p, temperature) than "
            "the update assumes, or compute in a precision too coarse for this model")


def mpo_loop(config: dict) -> None:
    job: LearnerJob = config["job"]
    stage = job.stage
    model, optimizer, device, rank, world_size, start = start_training(job, "step")
    stage.check_learners(world_size)
    if rank == 0:
        truncate_log(join(job.stage_dir, ROLLOUTS_LOG), start)
    ref_checkpoint = job.ref_checkpoint or job.init_checkpoint
    ref_model = load_checkpoint(fetch_checkpoint(ref_checkpoint), map_location=device)
    ref_model.requires_grad_(False)
    workers = job.rollout_workers
    spec = RolloutSpec.of_stage(stage, job.scenes_per_batch)
    num_scenarios = ray.get(workers[0].num_scenarios.remote(spec.dataset), timeout=job.task_timeout_s)
    own = numerics(device)  # what this learner computes in; the actors say what they do
    theirs = sorted({i["numerics"] for i in ray.get([w.info.remote() for w in workers], timeout=job.task_timeout_s)})
    if stage.kl_estimator == "k3" and job.reference_in_workers and theirs == [own]:
        # the workers run the frozen reference on their own rollouts and send log pi_ref: the
        # update skips that forward pass (mpo_step); the 'full' estimator needs it here. Every
        # rank names the driver's ObjectRef of the reference checkpoint, so an actor loads it once.
        spec = dataclasses.replace(spec, reference=(ref_checkpoint,))
    if rank == 0:
        say(f"[{stage.name}] rollout actors compute in {', '.join(theirs)}, the learners in {own}: log pi_ref "
            f"from the {'actors' if spec.reference else 'learners'}")
    sent: dict[int, ray.ObjectRef] = {}  # version -> the weights this rank sent the actors (pi_old's)
    scratch: dict = {}  # "model": a copy of the model for older versions' log-probs (made when first needed), "version"
    overlap = stage.max_staleness >= 1
    timer = PhaseTimer()
    guard = NonFiniteGuard(f"stage {stage.name}", stage.max_nonfinite_updates)
    progress = Progress(stage.name, stage.steps, start, rank == 0)
    if rank == 0:
        objective = ("the clipped ratio surrogate (MPO-3): batches are reused or sampled one update ahead"
                     if overlap or stage.updates_per_batch > 1 else "A * log pi (MPO-2): on-policy, each batch used once")
        say(f"[{stage.name}] objective: {objective}")

    def weights():
        with timer.phase("sync"):  # this rank's one ray.put per update
            if version not in sent:
                sent[version] = ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})
                for old in [v for v in sent if v < version - stage.max_staleness]:
                    del sent[old]  # no usable rollout was sampled with it any more
            return sent[version]

    def weights_of(v: int) -> torch.nn.Module:
        """The model at version v: this one, or the scratch copy loaded with the weights sent then."""
        if v == version:
            return model
        if "model" not in scratch:
            scratch["model"] = copy.deepcopy(getattr(model, "module", model))
        if scratch.get("version") != v:
            scratch["model"].load_state_dict(ray.get(sent[v]))
            scratch["version"] = v
        return scratch["model"]

    def numerics_of_learner(batch: ExperienceBatch, experiences: list[Experience], first: bool) -> tuple:
        """The batch with log pi_old and log pi_ref as the update needs them (see the module's
        docstring), and the first step's agreement figures ({} at other steps)."""
        found = {}
        current = None
        if first:
            current = learner_log_probs(model, batch, stage.sampling)
            found = check_agreement(current, batch, with_reference=start == 0 and same_reference)
            if rank == 0:
                kl = f"{found['check_kl']:.2e}" if "check_kl" in found else "not measured (the policy is not the reference)"
                say(f"[{stage.name}] first step: the actors' log-probs against the learner's: mean ratio "
                    f"{found['check_ratio']:.5f}, k3 KL to pi_old {found['check_kl_old']:.2e}, to pi_ref {kl} "
                    f"(actors {', '.join(theirs)}, learner {own})")
            problem = agreement_problem(found, ", ".join(theirs), own)
            if problem:
                raise RuntimeError(f"stage {stage.name}: {problem}")
        sources = {e.numerics for e in experiences}
        return in_learner_numerics(batch, sources, own, version, stage, weights_of, current), found

    def share_of(step: int) -> list[int]:
        """This rank's share of the step's scenarios."""
        return step_scenarios(job.seed, step, num_scenarios, stage.scenarios_per_step)[rank::world_size]

    def dispatch_share(step: int, attempt: int = 0) -> RolloutQueue:
        seeded = dataclasses.replace(spec, seed=step_sampling_seed(job.seed, step, attempt))
        return dispatch(workers, version, weights(), share_of(step), seeded, first=rank)

    def usable(queue: RolloutQueue) -> tuple[list[Experience], int, int]:
        """(fresh experiences, failed scenarios, stale scenarios) of this rank's dispatched share."""
        experiences, failed = collect(queue, job.task_timeout_s)
        fresh = [e for e in experiences if version - e.version <= stage.max_staleness]
        return fresh, failed, len(experiences) - len(fresh)

    def enough(totals: dict) -> bool:  # decided from all-reduced counts: alike on every rank
        return totals["usable"] >= needed and totals["empty_ranks"] == 0

    needed = math.ceil(stage.min_rollout_fraction * stage.scenarios_per_step)
    same_reference = ref_checkpoint == job.init_checkpoint  # at step 0 the policy is the reference
    version = start
    pending = dispatch_share(start)
    for step in range(start, stage.steps):
        maybe_fail(job, step)
        for phase in ("rollout", "sync"):  # every row names every phase (0 s where skipped)
            timer.add(phase, 0.0)
        with timer.phase("rollout"):
            experiences, failed, stale = usable(pending)
            totals = step_totals(experiences, failed, stale, device, world_size)
            if not enough(totals):  # every rank samples its share again, once, with the current weights
                if rank == 0:
                    say(f"[{stage.name}] RL step {step}: {totals['usable']:.0f} of {stage.scenarios_per_step} "
                        f"scenarios usable ({totals['failed']:.0f} failed, {totals['stale']:.0f} stale; "
                        f"{totals['empty_ranks']:.0f} learner ranks with none); sampling it again")
                experiences, failed_again, stale_again = usable(dispatch_share(step, attempt=1))
                failed, stale = failed + failed_again, stale + stale_again
                totals = step_totals(experiences, failed, stale, device, world_size)
                if not enough(totals):
                    raise RuntimeError(
                        f"stage {stage.name}, RL step {step}: only {totals['usable']:.0f} of {stage.scenarios_per_step} "
                        f"scenarios gave usable rollouts twice (min_rollout_fraction {stage.min_rollout_fraction}), "
                        f"and {totals['empty_ranks']:.0f} of {world_size} learner ranks had none of their share "
                        "(each needs one to take part in the update); the failures are named above")
        if overlap and step + 1 < stage.steps:  # sample the next step while this one updates
            pending = dispatch_share(step + 1)
        count = totals["usable"]
        if stage.alpha == "auto":  # the first batch, sampled by the starting policy, calibrates it
            stage = dataclasses.replace(stage, alpha=calibrated_alpha(
                job, totals["reward"] / count, int(count), rank, world_size, device))
        with timer.phase("adv"):
            batch, found = numerics_of_learner(collate_experiences(experiences, device), experiences, step == start)
        with timer.phase("update"):
            stats = mpo_step(model, ref_model, optimizer, batch, stage, version, world_size)
        if guard.update(stats["grad_norm"], f"RL step {step}"):
            version += 1  # the weights changed (a skipped update leaves the version as it was)
        else:
            say(f"[{stage.name}] RL step {step}: non-finite loss or gradient, update skipped")
        if not overlap and step + 1 < stage.steps:
            pending = dispatch_share(step + 1)
        log_ranks(job, step, {"rank": rank, "version": version, "scenarios": [e.scenario_index for e in experiences],
                              "rewards": [float(e.rewards.mean()) for e in experiences], "failed": failed,
                              "stale": stale, "weights_sha256": weights_digest(model)}, rank, world_size)
        means = {k: totals[k] / count for k in TOTALS[4:]}  # over every rank's scenarios
        metrics = {
            "step": step, "version": version, **({} if stage.alpha == "loo" else {"alpha": stage.alpha}),
            **stats, **timer.lap(), **means,
            **found, "actor_numerics": ",".join(sorted({e.numerics for e in experiences})),
            "rollouts_failed": int(totals["failed"]), "rollouts_stale": int(totals["stale"]),
            "scenarios": int(count), "scenarios_this_rank": len(experiences),
            "nonfinite_skipped": guard.skipped, "peak_rss_mb": peak_rss_mb(),
        }
        progress.line(step + 1, f"reward {metrics['reward']:.3f} realism {metrics['realism']:.3f} "
                                f"coll {metrics['collision_rate']:.3f} off {metrics['offroad_rate']:.3f} "
                                f"kl {stats['kl']:.4f} | {format_phases({k: v for k, v in metrics.items() if k.startswith('time_')})}")
        report(job, model, optimizer, step, metrics, rank, save=stage.saves_after(step))
