"""MPO on a toy policy: gradient signs follow the advantage, the KL term pulls towards the reference;
the whole RL step (`mpo_step`) on real experience, without Ray."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from smart_r1.config import MPOStage, SamplingConfig
from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.rl.experience import collate_experiences, make_experience
from smart_r1.rl.mpo import advantages, kl_per_token, mpo_loss, mpo_step
from smart_r1.rl.rewards import RewardConfig
from smart_r1.rollout.closed_loop import closed_loop, token_log_probs
from smart_r1.rollout.sampling import Sampler
from smart_r1.tokens.motion_vocab import build_vocab
from smart_r1.tokens.scene import build_scene


def _toy(num_rollouts=4, vocab=5):
    torch.manual_seed(0)
    logits = torch.zeros(num_rollouts, 1, 1, vocab, requires_grad=True)
    tokens = torch.arange(num_rollouts).reshape(num_rollouts, 1, 1) % vocab
    return logits, tokens


def _sampled(logits, tokens):
    return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def test_advantage_is_reward_minus_fixed_alpha():
    r = torch.tensor([0.9, 0.5, 0.77])
    assert torch.allclose(advantages(r, 0.77), torch.tensor([0.13, -0.27, 0.0]))


def test_leave_one_out_baseline():
    """Each rollout against the mean of the other rollouts of its scenario, per agent for per-agent
    rewards: sums to zero over the rollouts, and a constant shift of every reward changes nothing."""
    r = torch.tensor([0.9, 0.5, 0.7, 0.3])
    expected = torch.stack([r[i] - torch.cat([r[:i], r[i + 1:]]).mean() for i in range(4)])
    assert torch.allclose(advantages(r, "loo"), expected, atol=1e-6)
    per_agent = torch.tensor([[0.9, 0.1], [0.5, 0.2], [0.7, 0.6]])  # [R, S]
    a = advantages(per_agent, "loo")
    assert torch.allclose(a[:, 1], advantages(per_agent[:, 1], "loo")) and a.sum(0).abs().max() < 1e-6
    assert torch.allclose(advantages(per_agent + 0.3, "loo"), a, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 rollouts"):
        advantages(r[:1], "loo")


def test_gradient_sign_follows_advantage():
    logits, tokens = _toy()
    lp = _sampled(logits, tokens)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])  # rollouts 0, 2 above alpha, 1, 3 below
    mask = torch.ones_like(lp, dtype=torch.bool)
    loss, stats = mpo_loss(lp, lp.detach(), rewards, mask, alpha=0.5, beta=0.0)
    loss.backward()
    g = logits.grad[:, 0, 0]
    # gradient descent raises the logit of a token with positive advantage, lowers it otherwise
    assert (g[0, 0] < 0) and (g[2, 2] < 0)
    assert (g[1, 1] > 0) and (g[3, 3] > 0)
    assert abs(stats.mean_advantage) < 1e-6
    # one step of SGD moves the sampled tokens' probabilities the right way
    with torch.no_grad():
        new = _sampled(logits - 0.5 * logits.grad, tokens)
    assert new[0] > lp[0] and new[1] < lp[1]


def test_kl_term_pulls_towards_reference_and_is_zero_at_it():
    torch.manual_seed(1)
    ref_logits = torch.randn(3, 2, 4, 6)
    logits = (ref_logits + torch.randn_like(ref_logits)).requires_grad_(True)
    full = torch.log_softmax(logits, -1)
    full_ref = torch.log_softmax(ref_logits, -1)
    tokens = torch.distributions.Categorical(logits=logits.detach()).sample()
    lp = full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ref_lp = full_ref.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    mask = torch.ones_like(lp, dtype=torch.bool)
    exact = kl_per_token(lp, ref_lp, "full", full, full_ref)
    assert (exact > 0).all()
    assert (kl_per_token(lp, ref_lp, "k3") >= 0).all()
    assert torch.allclose(kl_per_token(full_ref[..., 0], full_ref[..., 0]), torch.zeros(3, 2, 4))
    # pure KL loss (reward == alpha): one gradient step lowers the exact KL
    loss, stats = mpo_loss(lp, ref_lp, torch.full((3,), 0.7), mask, alpha=0.7, beta=1.0,
                           kl_estimator="full", full_log_probs=full, full_ref_log_probs=full_ref)
    assert stats.policy_loss == 0.0 and stats.kl > 0
    loss.backward()
    with torch.no_grad():
        stepped = torch.log_softmax(logits - 1.0 * logits.grad, -1)
        after = (stepped.exp() * (stepped - full_ref)).sum(-1)
    assert after.mean() < exact.mean()


def test_k3_estimator_is_unbiased_on_average():
    torch.manual_seed(2)
    p = torch.log_softmax(torch.randn(8), -1)
    q = torch.log_softmax(torch.randn(8), -1)
    samples = torch.distributions.Categorical(logits=p).sample((200_000,))
    estimate = kl_per_token(p[samples], q[samples], "k3").mean()
    exact = (p.exp() * (p - q)).sum()
    assert abs(float(estimate - exact)) < 0.02


def test_clipping_and_mask():
    logits, tokens = _toy()
    lp = _sampled(logits, tokens)
    old = lp.detach() - 1.0  # ratio e^1 ~ 2.7: outside [0.8, 1.2]
    mask = torch.tensor([True, True, False, False]).reshape(4, 1, 1)
    _, stats = mpo_loss(lp, lp.detach(), torch.tensor([1.0, 1.0, 0.0, 0.0]), mask, alpha=0.5,
                        beta=0.0, old_log_probs=old, clip_eps=0.2)
    assert stats.clip_fraction == 1.0
    loss, _ = mpo_loss(lp, lp.detach(), torch.tensor([1.0, 1.0, 0.0, 0.0]), mask, alpha=0.5,
                       beta=0.0, old_log_probs=old, clip_eps=0.2)
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0, "clipped positive-advantage tokens get no gradient"


def test_per_agent_rewards_broadcast():
    lp = torch.zeros(2, 3, 4, requires_grad=True)
    rewards = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    loss, _ = mpo_loss(lp, lp.detach(), rewards, torch.ones(2, 3, 4, dtype=torch.bool), 0.5, 0.0)
    loss.backward()
    assert (lp.grad[0, 0] < 0).all() and (lp.grad[0, 1] > 0).all()


# -- the whole RL step, on CPU without Ray ---------------------------------------------------

@pytest.fixture(scope="module")
def experience(womd_record):
    """Two sampled rollouts of the real scenario, scored into experience (as an actor does)."""
    torch.manual_seed(0)
    vocab = build_vocab([womd_record], size=64, seed=0)
    model = SmartTiny(ModelConfig.preset("test"), vocab).eval()  # the actors' policy: no dropout
    scene = build_scene(womd_record, vocab, agents="sim")
    sampling = SamplingConfig(top_k=8)
    tensors = closed_loop(model, scene, 2, Sampler(**dataclasses.asdict(sampling),
                                                   generator=torch.Generator().manual_seed(0)))
    exp = make_experience(0, womd_record, scene, tensors, version=0, reward=RewardConfig())
    return model, exp, sampling


def test_experience_holds_the_actor_scene_and_rewards(experience):
    _, exp, _ = experience
    r, a = exp.tokens.shape[:2]
    assert exp.rewards.shape == (r,) and ((exp.rewards >= 0) & (exp.rewards <= 1)).all()
    assert exp.log_probs.shape == (r, a, 16) and (exp.log_probs <= 0).all()
    batch = collate_experiences([exp, exp])
    assert batch.tokens.shape == (2, r, a, 16) and batch.rewards.shape == (2, r)
    assert batch.live.shape == batch.tokens.shape and batch.live.any()


@pytest.mark.parametrize("alpha", [0.3, "loo"])
def test_mpo_step_moves_every_trainable_parameter(experience, alpha):
    model, exp, sampling = experience
    policy, reference = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False)
    stage = MPOStage(name="rft", lr=1e-4, alpha=alpha, beta=0.04, sampling=sampling)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=stage.lr, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    stats = mpo_step(policy, reference, optimizer, collate_experiences([exp]), stage, policy_version=0)
    assert stats["clipped_objective"] == 0, "one on-policy use of a batch is MPO-2"
    assert stats["grad_norm"] > 0 and stats["kl"] < 1e-6  # the policy equals its reference before the step
    unmoved = [n for n, p in policy.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unmoved, f"parameters that one MPO step did not move: {unmoved}"
    if alpha == "loo":  # two rollouts: A_0 = r_0 - r_1 = -A_1, averaged over the batch's tokens
        n = collate_experiences([exp]).live[0].flatten(1).sum(1).double()  # [R] live tokens per rollout
        gap = float(exp.rewards[0] - exp.rewards[1])
        assert stats["mean_advantage"] == pytest.approx(float((n[0] - n[1]) / n.sum()) * gap, abs=1e-6)


def test_mpo_step_descends_its_objective(experience):
    """A small plain gradient step lowers -mean(A log pi) by the first-order amount lr * |g|^2:
    the step differentiates the objective it reports, through the sampler's log-probs."""
    model, exp, sampling = experience
    batch = collate_experiences([exp])
    stage = MPOStage(name="rft", lr=1e-2, alpha=0.0, beta=0.0, sampling=sampling)

    def objective(m) -> float:
        with torch.no_grad():
            lp = token_log_probs(m, batch.scenes, batch.tokens, batch.poses, **dataclasses.asdict(sampling))
            loss, _ = mpo_loss(lp.flatten(0, 1), lp.flatten(0, 1), batch.rewards.flatten(0, 1),
                               batch.live.flatten(0, 1), stage.alpha, 0.0)
        return float(loss)

    policy, reference = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False)
    before = objective(policy)
    stats = mpo_step(policy, reference, torch.optim.SGD(policy.parameters(), lr=stage.lr), batch, stage, 0)
    g = stats["grad_norm"]
    predicted = stage.lr * min(g, stage.grad_clip) * g  # the clipped step's first-order decrease
    assert before - objective(policy) == pytest.approx(predicted, rel=0.3)


def test_mpo_step_clips_stale_or_reused_batches(experience):
    model, exp, sampling = experience
    stage = MPOStage(name="rft", lr=1e-3, sampling=sampling)
    policy, reference = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=stage.lr)
    batch = collate_experiences([exp])
    assert mpo_step(policy, reference, optimizer, batch, stage, policy_version=1)["clipped_objective"] == 1
    reused = dataclasses.replace(stage, updates_per_batch=2)
    assert mpo_step(policy, reference, optimizer, batch, reused, policy_version=0)["clipped_objective"] == 1
