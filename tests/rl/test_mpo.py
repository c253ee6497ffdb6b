"""MPO on a toy policy: gradient signs follow the advantage, the KL term pulls towards the reference."""

from __future__ import annotations

import torch

from smart_r1.rl.mpo import advantages, kl_per_token, mpo_loss


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
