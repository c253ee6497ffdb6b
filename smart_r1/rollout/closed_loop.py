"""Closed-loop simulation: from the 11-step history every sim agent advances token by token, all
rollouts of all scenes in one batched forward per 0.5 s step; and the teacher-forced log-probs of
given rollouts (with gradients) for policy-gradient and KL terms.

Flattened axes: N = B * R scene-major ("scene b, rollout r" is row b * R + r).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smart_r1.model import precision
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.rollout.sampling import Candidates, Sampler, TokenSelector, sampled_log_probs
from smart_r1.tokens.geometry import compose
from smart_r1.tokens.motion_vocab import NUM_FUTURE_TOKENS, NUM_HISTORY_TOKENS, SHIFT
from smart_r1.tokens.scene import SceneBatch, build_scene, collate, repeat_scenes
from smart_r1.types import Rollout


@dataclass(frozen=True)
class RolloutTensors:
    """Rollouts of a SceneBatch (B scenes, R rollouts, A agent slots), scene frame.

    tokens: long [B, R, A, 16]; log_probs: float32 [B, R, A, 16] under the selector's distribution
    (`TokenSelector.log_prob`: the sampler's for a Sampler, the model's for Greedy and CAT-K)
    poses: float32 [B, R, A, 80, 3], (x, y, heading) at 10 Hz relative to the scene origin
    """

    tokens: torch.Tensor
    log_probs: torch.Tensor
    poses: torch.Tensor

    def scene(self, i: int, num_agents: int) -> "RolloutTensors":
        """Scene i of a collated batch on its own, [1, R, num_agents, ...]: its first `num_agents`
        agent slots, which are its own (`collate` pads after them)."""
        return RolloutTensors(*(x[i:i + 1, :, :num_agents] for x in (self.tokens, self.log_probs, self.poses)))


@torch.no_grad()
def closed_loop(model: SmartTiny, batch: SceneBatch, num_rollouts: int = 32, selector: TokenSelector | None = None,
                use_cache: bool = True) -> RolloutTensors:
    """Simulate 16 tokens (80 steps) for every sim agent of every scene, `num_rollouts` times.

    Agents that are not sim agents (or padding) stay still and are invisible to the others.
    use_cache=False recomputes the whole history at every step (the reference the KV cache is
    checked and benchmarked against)."""
    model.eval()
    device = model.device
    batch = batch.to(device)
    selector = selector or Sampler()
    b, a = batch.agent_mask.shape
    n = b * num_rollouts
    vocab_size = model.cfg.vocab_size
    if a == 0:
        empty = torch.zeros(b, num_rollouts, 0, NUM_FUTURE_TOKENS, device=device)
        return RolloutTensors(empty.long(), empty, torch.zeros(b, num_rollouts, 0, NUM_FUTURE_TOKENS * SHIFT, 3, device=device))
    rep = repeat_scenes(batch, num_rollouts)  # [N, A, ...]
    live = rep.sim_mask & rep.agent_mask  # [N, A]
    h = NUM_HISTORY_TOKENS
    tokens = rep.tokens[:, :, :h].clone()  # [N, A, 2] slot inputs so far
    poses = rep.anchor_pose[:, :, 1:h + 1].clone()  # [N, A, 2, 3] pose reached by each slot's token
    valid = rep.token_valid[:, :, :h] & live[..., None]  # [N, A, 2]
    contours = model.vocab.contours.to(device)[rep.agent_type]  # [N, A, V, SHIFT, 3]
    pose = rep.anchor_pose[:, :, h]  # [N, A, 3] current pose (step 10)
    out_tokens, out_logp, out_poses = [], [], []
    with precision.autocast(device):
        ctx = model.encode_map(batch).repeat(num_rollouts)  # map encoded once per scene
        cache = model.new_cache(n, a, dtype=precision.compute_dtype(device)) if use_cache else None
        logits = model.decode(ctx, tokens, rep.agent_type, poses, valid, 0, cache)[:, :, -1]  # [N, A, V]
        for step in range(NUM_FUTURE_TOKENS):  # one token per agent per step, all agents together
            flat = logits.float().reshape(n * a, vocab_size)  # [N * A, V]
            cand = None
            if selector.needs_candidates:
                cand = Candidates(pose.reshape(n * a, 3), contours.reshape(n * a, vocab_size, SHIFT, 3),
                                  rep.agent_type.reshape(n * a))
            chosen = selector(flat, cand, step).view(n, a)  # [N, A]
            chosen = torch.where(live, chosen, torch.zeros_like(chosen))
            logp = selector.log_prob(flat, chosen.reshape(-1)).view(n, a)  # [N, A]
            idx = chosen[:, :, None, None, None].expand(n, a, 1, SHIFT, 3)  # [N, A, 1, SHIFT, 3]
            moved = compose(pose[:, :, None], contours.gather(2, idx)[:, :, 0])  # [N, A, SHIFT, 3]
            moved = torch.where(live[:, :, None, None], moved, pose[:, :, None].expand_as(moved))
            pose = moved[:, :, -1]  # [N, A, 3]
            out_tokens.append(chosen), out_logp.append(logp), out_poses.append(moved)
            if step == NUM_FUTURE_TOKENS - 1:
                break
            slot = h + step  # this token is the input of slot h + step
            if use_cache:
                logits = model.decode(ctx, chosen[:, :, None], rep.agent_type, pose[:, :, None], live[:, :, None],
                                      slot, cache)[:, :, 0]  # [N, A, V]
            else:
                tokens = torch.cat([tokens, chosen[:, :, None]], 2)  # [N, A, slot + 1]
                poses = torch.cat([poses, pose[:, :, None]], 2)  # [N, A, slot + 1, 3]
                valid = torch.cat([valid, live[:, :, None]], 2)  # [N, A, slot + 1]
                logits = model.decode(ctx, tokens, rep.agent_type, poses, valid)[:, :, -1]  # [N, A, V]
    shape = (b, num_rollouts, a)
    return RolloutTensors(torch.stack(out_tokens, -1).view(*shape, -1),  # [B, R, A, 16]
                          torch.stack(out_logp, -1).view(*shape, -1),  # [B, R, A, 16]
                          torch.cat(out_poses, 2).float().view(*shape, -1, 3))  # [B, R, A, 80, 3]


def token_log_probs(model, batch: SceneBatch, tokens: torch.Tensor, poses: torch.Tensor, full: bool = False,
                    top_k: int = 0, top_p: float = 1.0,
                    temperature: float = 1.0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (with gradients) of given rollouts, teacher-forced on the rollouts' own
    states: one batched forward over all B * R rollouts.

    tokens long [B, R, A, 16], poses [B, R, A, 80, 3] (RolloutTensors fields) -> [B, R, A, 16],
    under the sampler's distribution (`sampled_log_probs` with top_k / top_p / temperature; the
    defaults give the model's own); with full=True also the model's whole log-softmax
    [B, R, A, 16, V] (temperature 1, for a KL term or CAT-K). Entries of agents that are not sim
    agents are 0. `model` may be wrapped in DistributedDataParallel."""
    core = getattr(model, "module", model)
    b, r, a = tokens.shape[:3]
    rep = repeat_scenes(batch, r)  # [N, A, ...]
    live = rep.sim_mask & rep.agent_mask  # [N, A]
    h = NUM_HISTORY_TOKENS
    tok = tokens.reshape(b * r, a, -1)  # [N, A, 16]
    reached = poses.reshape(b * r, a, -1, 3)[:, :, SHIFT - 1::SHIFT]  # [N, A, 16, 3] pose after each token
    in_tokens = torch.cat([rep.tokens[:, :, :h], tok[:, :, :-1]], 2)  # [N, A, 17]
    in_poses = torch.cat([rep.anchor_pose[:, :, 1:h + 1], reached[:, :, :-1]], 2)  # [N, A, 17, 3]
    in_valid = torch.cat([rep.token_valid[:, :, :h], live[:, :, None].expand(-1, -1, NUM_FUTURE_TOKENS - 1)], 2)
    in_valid = in_valid & live[..., None]  # [N, A, 17]
    with precision.autocast(tokens.device):
        ctx = core.encode_map(batch).repeat(r)
        logits = core.decode(ctx, in_tokens, rep.agent_type, in_poses, in_valid)[:, :, h - 1:]  # [N, A, 16, V]
    chosen = sampled_log_probs(logits, tok, top_k, top_p, temperature) * live[..., None]  # [N, A, 16]
    chosen = chosen.view(b, r, a, -1)  # [B, R, A, 16]
    if full:  # the whole log-softmax only when asked: [N, A, 16, V] is the largest tensor here
        logp_all = logits.float().log_softmax(-1)
        return chosen, logp_all.view(b, r, a, *logp_all.shape[2:])  # [B, R, A, 16, V]
    return chosen


def to_rollouts(batch: SceneBatch, out: RolloutTensors) -> list[Rollout]:
    """One Rollout per scene, sim agents only, in agent order, world coordinates (z held at now)."""
    result = []
    for i, scenario_id in enumerate(batch.scenario_id):
        keep = (batch.sim_mask[i] & batch.agent_mask[i]).cpu()  # [A]
        poses = out.poses[i][:, keep].double().cpu()  # [R, S, 80, 3]
        xy = poses[..., :2] + batch.origin[i].double().cpu()  # [R, S, 80, 2]
        z = batch.agent_z[i][keep].cpu().double()[None, :, None, None].expand(*poses.shape[:3], 1)  # [R, S, 80, 1]
        states = torch.cat([xy, z, poses[..., 2:]], -1).float().numpy()  # [R, S, 80, 4]
        result.append(Rollout(scenario_id=scenario_id, agent_ids=batch.agent_id[i][keep].cpu().numpy(),
                              states=states, tokens=out.tokens[i][:, keep].cpu().numpy(),
                              log_probs=out.log_probs[i][:, keep].float().cpu().numpy()).validate())
    return result


def rollout_records(model: SmartTiny, records, num_rollouts: int = 32, selector: TokenSelector | None = None,
                    scenes_per_batch: int = 1) -> list[Rollout]:
    """Closed-loop rollouts of ScenarioRecords (scenes built with the model's own vocabulary)."""
    results = []
    records = list(records)
    for start in range(0, len(records), scenes_per_batch):
        group = records[start:start + scenes_per_batch]
        batch = collate([build_scene(rec, model.vocab, agents="sim") for rec in group])
        results.extend(to_rollouts(batch, closed_loop(model, batch, num_rollouts, selector)))
    return results

