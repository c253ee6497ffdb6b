"""Closed-loop rollouts: shapes, the KV cache against recomputing everything, log-probs recomputed
with gradients, samplers, CAT-K, empty scenes, and rollouts the official evaluator accepts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.rollout.closed_loop import closed_loop, rollout_records, to_rollouts, token_log_probs
from smart_r1.rollout.sampling import Greedy, Sampler, catk_selector, filter_logits, sampled_log_probs
from smart_r1.tokens.motion_vocab import build_vocab
from smart_r1.tokens.scene import build_scene


@pytest.fixture(scope="module")
def model(womd_record):
    torch.manual_seed(0)
    vocab = build_vocab([womd_record], size=ModelConfig.preset("test").vocab_size, iters=3)
    return SmartTiny(ModelConfig.preset("test"), vocab).eval()


@pytest.fixture(scope="module")
def scene(womd_record, model):
    return build_scene(womd_record, model.vocab, agents="sim", max_map_segments=256)


def test_rollout_shapes_and_world_frame(womd_record, model, scene):
    out = closed_loop(model, scene, 3, Sampler(top_k=8, generator=torch.Generator().manual_seed(0)))
    s = int(womd_record.sim_agent_mask.sum())
    assert out.tokens.shape == (1, 3, s, 16) and out.poses.shape == (1, 3, s, 80, 3)
    rollout = to_rollouts(scene, out)[0]
    assert rollout.states.shape == (3, s, 80, 4)
    assert np.array_equal(rollout.agent_ids, womd_record.sim_agent_ids)
    # the first simulated step starts next to the logged current position, z is held
    now = womd_record.xyz[womd_record.sim_agent_mask, 10]
    assert np.abs(rollout.states[:, :, 0, :2] - now[None, :, :2]).max() < 5.0
    assert np.allclose(rollout.states[..., 2], now[None, :, None, 2], atol=1e-3)
    assert (rollout.log_probs <= 0).all() and np.isfinite(rollout.log_probs).all()
    # different rollouts differ (sampling), and token i's last step is where token i + 1 starts
    assert (out.tokens[0, 0] != out.tokens[0, 1]).any()


def test_kv_cache_matches_recomputing_everything_and_log_probs(model, scene):
    cached = closed_loop(model, scene, 2, Greedy())
    full = closed_loop(model, scene, 2, Greedy(), use_cache=False)
    assert torch.equal(cached.tokens, full.tokens)
    assert torch.allclose(cached.log_probs, full.log_probs, atol=1e-4)
    model.train(False)
    logp, logp_all = token_log_probs(model, scene, cached.tokens, cached.poses, full=True)
    assert torch.allclose(logp, cached.log_probs, atol=1e-4)
    assert logp_all.shape == (*cached.tokens.shape, model.cfg.vocab_size)
    logp.sum().backward()
    assert all(p.grad is not None for p in model.decoder.head.parameters())
    model.zero_grad(set_to_none=True)


def test_sampled_rollouts_record_the_samplers_own_log_probs(model, scene):
    sampler = Sampler(top_k=8, temperature=0.7, generator=torch.Generator().manual_seed(1))
    out = closed_loop(model, scene, 2, sampler)
    model.train(False)
    logp, logp_all = token_log_probs(model, scene, out.tokens, out.poses, full=True, top_k=8, temperature=0.7)
    live = scene.sim_mask[:, None, :, None].expand(out.tokens.shape)
    assert torch.allclose(logp[live], out.log_probs[live], atol=1e-4)
    # q puts all its mass on 8 tokens, so each is likelier under q than under the model
    model_logp = logp_all.gather(-1, out.tokens[..., None])[..., 0]
    assert (logp[live] > model_logp[live]).all()


def test_sampled_log_probs_are_the_samplers_distribution():
    torch.manual_seed(0)
    logits = torch.randn(6, 30, requires_grad=True)
    chosen = logits.detach().topk(3, dim=-1).indices[:, 1]  # [6]
    q = filter_logits(logits.detach(), top_k=3, temperature=0.5).softmax(-1)
    assert torch.allclose(sampled_log_probs(logits, chosen, top_k=3, temperature=0.5),
                          q.gather(1, chosen[:, None])[:, 0].log(), atol=1e-5)
    assert torch.allclose(sampled_log_probs(logits, chosen), logits.log_softmax(-1).gather(1, chosen[:, None])[:, 0])
    # the gradient stays on the kept tokens: the tail's logits do not move
    sampled_log_probs(logits, chosen, top_k=3).sum().backward()
    tail = filter_logits(logits.detach(), top_k=3).isinf()
    assert (logits.grad[tail] == 0).all() and (logits.grad[~tail] != 0).any()
    # a token the model no longer ranks in its top k keeps a finite probability
    outside = logits.detach().argmin(-1)
    assert torch.isfinite(sampled_log_probs(logits.detach(), outside, top_k=3)).all()


def test_filters_and_catk(model, scene):
    logits = torch.randn(5, 40)
    x = filter_logits(logits, top_k=3)
    assert (torch.isfinite(x).sum(-1) == 3).all()
    x = filter_logits(logits, top_p=0.5)
    p = logits.softmax(-1)
    kept = torch.isfinite(x)
    assert (p[kept.logical_not()].sum() >= 0).all() and (kept.sum(-1) >= 1).all()
    assert ((p * kept).sum(-1) >= 0.5 - 1e-6).all()  # the nucleus holds at least top_p of the mass
    # CAT-K stays closer to the log than sampling from an untrained model
    catk = closed_loop(model, scene, 1, catk_selector(scene, 1, catk_k=16))
    free = closed_loop(model, scene, 1, Sampler(generator=torch.Generator().manual_seed(0)))
    log = scene.log_anchor_pose[0, :, 3:, :2]  # [A, 16, 2]
    ok = scene.anchor_valid[0, :, 3:]

    def err(out):
        return float((out.poses[0, 0, :, 4::5, :2] - log).norm(dim=-1)[ok].mean())
    assert err(catk) < 0.5 * err(free)


def test_scene_without_sim_agents_gives_an_empty_rollout(womd_record, model):
    empty = womd_record.replace(valid=womd_record.valid & False)
    rollout = rollout_records(model, [empty], num_rollouts=4)[0]
    assert rollout.states.shape == (4, 0, 80, 4) and rollout.tokens.shape == (4, 0, 16)


@pytest.mark.slow
def test_rollouts_pass_the_official_evaluator(womd_record, model):
    from smart_r1.metrics.official import official_scenario_metrics
    from smart_r1.metrics.rollouts_io import states_to_scenario_rollouts
    from smart_r1.metrics.wosac import compute_scenario_metrics

    rollout = rollout_records(model, [womd_record], num_rollouts=2, selector=Sampler(top_k=5))[0]
    proto = states_to_scenario_rollouts(womd_record, rollout.states)
    assert len(proto.joint_scenes) == 2
    official = official_scenario_metrics(womd_record, proto)
    fast = compute_scenario_metrics(womd_record, rollout.states)
    assert 0.0 < official["metametric"] < 1.0
    assert abs(official["metametric"] - fast["metametric"]) < 0.02
