"""The leaner MPO update is the same update: scenes run without padding give the padded batch's
loss, statistics and step; the reference log-probs a rollout worker sends are the ones the learner
would compute, and with them the learner never runs the reference."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch

from smart_r1.config import MPOStage, SamplingConfig
from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.rl.experience import collate_experiences, make_experience, reference_log_probs
from smart_r1.rl.mpo import mpo_step
from smart_r1.rl.rewards import RewardConfig
from smart_r1.rollout.closed_loop import RolloutTensors, closed_loop, token_log_probs
from smart_r1.rollout.sampling import Sampler
from smart_r1.tokens.motion_vocab import build_vocab
from smart_r1.tokens.scene import build_scene, collate, unpad

# float32, the same sums in another order (padding is masked out either way): measured 1e-7 on
# log-probs, and on the weights after an SGD step.
ATOL = 1e-5
# A scene alone against the same scene padded in a batch: also the nearest-neighbour choice can
# differ where two map segments are equally near (torch.cdist's matmul form rounds differently for
# other sizes): measured 8e-5 nats at worst.
PAD_ATOL = 1e-3


@pytest.fixture(scope="module")
def two_scenes(womd_record):
    """Experiences of two scenes of different sizes (agents and map segments), as actors make
    them: the policy's rollouts, and the reference's log-probs of them (a different model)."""
    torch.manual_seed(0)
    vocab = build_vocab([womd_record], size=64, seed=0)
    policy = SmartTiny(ModelConfig.preset("test", vocab_size=64), vocab).eval()
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # the whole vocabulary: top-k's cut is discontinuous, and padding changes the summation order
    # of near-tied logits at 1e-7, which can move a token across the cut (measured: 3e-3 nats once)
    sampling = SamplingConfig(temperature=1.5)
    # a second, smaller scene: the same scenario with only the predicted tracks and the ego car
    keep = np.zeros(len(womd_record.object_id), bool)
    keep[womd_record.tracks_to_predict] = keep[womd_record.sdc_index] = True
    small = dataclasses.replace(womd_record, valid=womd_record.valid & keep[:, None])
    experiences = []
    for i, (record, segments) in enumerate(((womd_record, 128), (small, 64))):
        scene = build_scene(record, vocab, agents="sim", max_map_segments=segments)
        tensors = closed_loop(policy, scene, 2, Sampler(**dataclasses.asdict(sampling),
                                                        generator=torch.Generator().manual_seed(i)))
        ref = reference_log_probs(reference, scene, tensors, sampling)
        experiences.append(make_experience(i, record, scene, tensors, version=0, reward=RewardConfig(),
                                           ref_log_probs=ref))
    assert experiences[1].tokens.shape[1] < experiences[0].tokens.shape[1]  # fewer agents to pad
    return policy, reference, experiences, sampling


def test_unpad_inverts_collate(two_scenes):
    _, _, experiences, _ = two_scenes
    batch = collate([e.scene for e in experiences])
    for i, e in enumerate(experiences):
        alone = unpad(batch, i)
        for f in dataclasses.fields(alone):
            got, want = getattr(alone, f.name), getattr(e.scene, f.name)
            assert (got == want) if f.name == "scenario_id" else torch.equal(got, want), f.name


def test_actor_reference_log_probs_are_the_learners(two_scenes):
    _, reference, experiences, sampling = two_scenes
    batch = collate_experiences(experiences)
    assert batch.ref_log_probs is not None and batch.ref_log_probs.shape == batch.tokens.shape
    with torch.no_grad():
        learner = token_log_probs(reference, batch.scenes, batch.tokens, batch.poses, **dataclasses.asdict(sampling))
    assert (batch.ref_log_probs - learner)[batch.live].abs().max() < PAD_ATOL
    for part in batch.per_scene():  # what the per-scene update would compute: the same shapes, the same numbers
        with torch.no_grad():
            again = token_log_probs(reference, part.scenes, part.tokens, part.poses, **dataclasses.asdict(sampling))
        assert (part.ref_log_probs - again)[part.live].abs().max() < 1e-6
    # one rollout per reference pass (a worker bounding its memory): the same log-probs
    e = experiences[0]
    one_pass = RolloutTensors(torch.as_tensor(e.tokens)[None], torch.as_tensor(e.log_probs)[None],
                              torch.as_tensor(e.poses)[None])
    split = reference_log_probs(reference, e.scene, one_pass, sampling, agent_rollouts_per_pass=1)
    assert split.shape == (1, *e.tokens.shape)
    assert (split - torch.as_tensor(e.ref_log_probs)[None]).abs().max() < 1e-6
    # an experience without them (an older worker) makes the learner compute them all
    assert collate_experiences([experiences[0], dataclasses.replace(experiences[1], ref_log_probs=None)]).ref_log_probs is None


@pytest.mark.parametrize("stage_kwargs", [dict(), dict(kl_estimator="full"), dict(updates_per_batch=2)])
def test_per_scene_update_and_sent_reference_equal_the_padded_update(two_scenes, stage_kwargs):
    policy, reference, experiences, sampling = two_scenes
    stage = MPOStage(name="rft", lr=1e-2, alpha=0.3, beta=0.5, sampling=sampling, **stage_kwargs)
    batch = collate_experiences(experiences)
    learner_ref = dataclasses.replace(batch, ref_log_probs=None)  # today's path: the learner runs pi_ref

    def step(b, per_scene, ref_model):
        model = copy.deepcopy(policy)
        stats = mpo_step(model, ref_model, torch.optim.SGD(model.parameters(), lr=stage.lr), b, stage, 0,
                         per_scene=per_scene)
        return stats, dict(model.named_parameters())

    base_stats, base = step(learner_ref, False, reference)
    runs = [step(learner_ref, True, reference)]
    if stage.kl_estimator == "k3":  # the sent log-probs replace the reference's forward pass entirely
        runs.append(step(batch, True, None))
    for stats, params in runs:
        for k, v in base_stats.items():
            assert stats[k] == pytest.approx(v, rel=1e-4, abs=ATOL), k
        for name, p in params.items():
            assert (p - base[name]).abs().max() < PAD_ATOL * stage.lr, name
    assert base_stats["kl"] > 0  # the reference differs from the policy: the KL term is exercised


class _GradientRecorder(torch.optim.Optimizer):
    """An optimiser that applies nothing and keeps the gradient it was asked to apply."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]


# (per_scene, rollouts_per_backward) of the split updates compared with one graph over the padded batch
PER_SCENE, PER_CHUNK = (True, 0), (True, 1)


@pytest.mark.parametrize("stage_kwargs,version,splits", [
    (dict(), 1, (PER_SCENE, PER_CHUNK)),  # log pi_ref sent by the workers; stale rollouts: the clipped objective
    (dict(kl_estimator="full"), 0, (PER_CHUNK,)),  # the learner runs pi_ref for each part
])
def test_backward_per_scene_and_per_chunk_give_the_single_graph_gradient(two_scenes, stage_kwargs, version, splits):
    """One graph over the padded batch, one backward per scene, one per chunk of a scene's
    rollouts: the same gradient and statistics, each part's graph built and backpropagated
    before the next is built (forward, backward, forward, backward, ...)."""
    policy, reference, experiences, sampling = two_scenes
    batch = collate_experiences(experiences)

    def gradient(per_scene: bool, rollouts_per_backward: int) -> tuple[list[torch.Tensor], list[str], dict]:
        stage = MPOStage(name="rft", alpha=0.3, beta=0.5, grad_clip=1e9, sampling=sampling,
                         rollouts_per_backward=rollouts_per_backward, **stage_kwargs)
        model = copy.deepcopy(policy)
        events: list[str] = []
        model.decoder.register_forward_hook(lambda *_: events.append("forward"))
        model.decoder.register_full_backward_hook(lambda *_: events.append("backward"))
        recorder = _GradientRecorder(model.parameters())
        with warnings.catch_warnings():  # the decoder's inputs need no gradient: its hook fires on its outputs'
            warnings.simplefilter("ignore", UserWarning)
            stats = mpo_step(model, reference, recorder, batch, stage, version, per_scene=per_scene)
        return recorder.grads, events, stats

    one_graph, events, base_stats = gradient(per_scene=False, rollouts_per_backward=0)
    assert events == ["forward", "backward"] and base_stats["clipped_objective"] == version
    scale = max(float(g.abs().max()) for g in one_graph)
    assert scale > 0 and batch.tokens.shape[:2] == (2, 2)  # 2 scenes x 2 rollouts
    for per_scene, chunk in splits:
        grads, events, stats = gradient(per_scene, chunk)
        assert events == ["forward", "backward"] * (4 if chunk else 2), (per_scene, chunk)
        for k, v in base_stats.items():
            assert stats[k] == pytest.approx(v, rel=1e-4, abs=ATOL), (per_scene, chunk, k)
        # a scene alone against the padded batch: PAD_ATOL (module header), relative to the gradient
        worst = max(float((g - h).abs().max()) for g, h in zip(grads, one_graph))
        assert worst <= PAD_ATOL * scale, (per_scene, chunk, worst / scale)
