"""SMART's token noise for BC (`tokenize(..., noise_top_k)`, `with_noisy_tokens`), on the shared
WOMD scenario and generated SUMO scenes padded into one batch."""

from __future__ import annotations

import pytest
import torch

from smart_r1.data.womd import read_scenarios
from smart_r1.tokens.geometry import compose
from smart_r1.tokens.motion_vocab import SHIFT, build_vocab
from smart_r1.tokens.scene import build_scene, collate, with_noisy_tokens
from smart_r1.tokens.tokenize import token_distance


@pytest.fixture(scope="module")
def vocab_and_batch(womd_record, sumo_tfrecords):
    sumo = [next(read_scenarios(p)) for p in sorted(sumo_tfrecords.glob("*.tfrecord"))]
    vocab = build_vocab([womd_record, *sumo], size=128, iters=3)
    scenes = [build_scene(r, vocab, agents="all", max_agents=64) for r in (womd_record, *sumo)]
    assert len({s.agent_mask.shape[1] for s in scenes}) > 1  # the batch pads some scenes
    return vocab, collate(scenes)


def _noisy(vocab, batch, k, seed):
    return with_noisy_tokens(batch, vocab, k, torch.Generator().manual_seed(seed))


def test_without_noise_the_batch_keeps_its_tokens(vocab_and_batch):
    vocab, batch = vocab_and_batch
    again = _noisy(vocab, batch, 1, 0)
    for name in ("tokens", "token_valid", "anchor_pose", "anchor_valid"):
        assert torch.equal(getattr(again, name), getattr(batch, name)), name


def test_noisy_tokens_are_among_the_k_closest_and_steer_back(vocab_and_batch):
    vocab, batch = vocab_and_batch
    k = 5
    noisy = _noisy(vocab, batch, k, 0)
    valid = batch.token_valid
    assert torch.equal(noisy.token_valid, valid) and torch.equal(noisy.anchor_valid, batch.anchor_valid)
    # the first token is the tokenizer's own; later ones differ often (uniform among k)
    assert torch.equal(noisy.tokens[..., 0][valid[..., 0]], batch.tokens[..., 0][valid[..., 0]])
    later = valid[..., 1:]
    changed = (noisy.tokens[..., 1:] != batch.tokens[..., 1:])[later].float().mean()
    assert 0.5 < changed < 1.0, float(changed)

    # every noisy token is one of the k closest to the log from the noisy reconstructed start
    b, a = valid.shape[:2]
    flat = lambda t: t.reshape(b * a, *t.shape[2:])  # noqa: E731
    types, log_pose, log_valid = flat(batch.agent_type), flat(batch.log_pose), flat(batch.log_valid)
    start, tokens, tvalid = flat(noisy.anchor_pose), flat(noisy.tokens), flat(valid)
    contours = vocab.contours[types]  # [N, V, SHIFT, 3]
    for i in range(1, tokens.shape[1]):
        rows = tvalid[:, i]
        steps = slice(i * SHIFT + 1, (i + 1) * SHIFT + 1)
        d = token_distance(compose(start[rows, i, None, None, :], contours[rows]), log_pose[rows, steps],
                           log_valid[rows, steps], types[rows])  # [n, V]
        chosen = d.gather(1, tokens[rows, i, None])[:, 0]
        kth = d.topk(k, dim=-1, largest=False).values[:, -1]
        assert (chosen <= kth + 1e-5).all(), i
    # drift does not accumulate: the noisy anchors stay near the log at the last anchor as at the first
    err = (noisy.anchor_pose[..., :2] - batch.log_anchor_pose[..., :2]).norm(dim=-1)  # [B, A, 19]
    on = noisy.anchor_valid
    clean = (batch.anchor_pose[..., :2] - batch.log_anchor_pose[..., :2]).norm(dim=-1)
    assert float(err[on].mean()) > float(clean[on].mean())
    early, late = err[..., 2:6][on[..., 2:6]].mean(), err[..., 14:][on[..., 14:]].mean()
    print(f"noisy anchors off the log: {float(early):.3f} m early, {float(late):.3f} m late; "
          f"clean {float(clean[on].mean()):.3f} m; {float(changed):.2f} of later tokens changed")
    assert late < 2 * early + 0.5, (float(early), float(late))


def test_noise_is_drawn_from_the_generator(vocab_and_batch):
    vocab, batch = vocab_and_batch
    a, b, c = (_noisy(vocab, batch, 5, s).tokens for s in (3, 3, 4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
