"""The RFT learner's handling of the actors' log-probs (smart_r1.distributed.mpo_loop): at the
sampling weights they agree with the learner's up to the numerics, within the stage's first-step
tolerance across float32 and bfloat16, and a mismatch of sampling config or weights is stopped with
a message that names it; rollouts of other numerics get the learner's own log pi_old and pi_ref.
Without Ray: the functions the learner loop calls."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from smart_r1.config import MPOStage, SamplingConfig
from smart_r1.data.index import scenario_index
from smart_r1.distributed.mpo_loop import agreement_problem, check_agreement, in_learner_numerics, learner_log_probs
from smart_r1.model import precision
from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.rl.experience import ExperienceBatch, reference_log_probs
from smart_r1.rollout.closed_loop import closed_loop
from smart_r1.rollout.sampling import Sampler
from smart_r1.tokens.motion_vocab import build_vocab
from smart_r1.tokens.scene import build_scene, collate

SAMPLING = SamplingConfig(top_k=8)
PRECISIONS = ("float32", "bfloat16")


def _batch(model, scene, actor_precision: str, sampling: SamplingConfig = SAMPLING) -> ExperienceBatch:
    """One scene's RL batch as a rollout actor computing in `actor_precision` sends it: the
    sampler's log pi_old and the full forward's log pi_ref (rewards do not matter here)."""
    with precision.using(actor_precision):
        torch.manual_seed(0)
        tensors = closed_loop(model, scene, 4, Sampler(**dataclasses.asdict(sampling)))
        ref = reference_log_probs(model, scene, tensors, sampling)
    return ExperienceBatch(scenes=scene, tokens=tensors.tokens, poses=tensors.poses, old_log_probs=tensors.log_probs,
                           rewards=torch.zeros(1, 4), versions=torch.zeros(1, dtype=torch.int64), ref_log_probs=ref)


@pytest.fixture(scope="module")
def sampled(sumo_shards):
    """A small model, one scene, and its batch as actors of each precision send it."""
    (record,) = scenario_index(str(sumo_shards)).read([0])
    torch.manual_seed(0)
    model = SmartTiny(ModelConfig.preset("test"), build_vocab([record], size=ModelConfig.preset("test").vocab_size,
                                                              iters=3)).eval()
    scene = build_scene(record, model.vocab, agents="sim")
    return model, {name: _batch(model, scene, name) for name in PRECISIONS}


def test_the_actors_agree_with_the_learner_at_the_sampling_weights(sampled):
    model, batches = sampled
    for actors in PRECISIONS:
        for learner in PRECISIONS:
            batch = batches[actors]
            with precision.using(learner):
                found = check_agreement(learner_log_probs(model, batch, SAMPLING), batch, with_reference=True)
            tight = actors == learner == "float32"
            assert found["check_ratio"] == pytest.approx(1.0, abs=1e-5 if tight else 0.02), (actors, learner)
            assert 0.0 <= found["check_kl"] <= (1e-8 if tight else 1e-3), (actors, learner, found)
            assert 0.0 <= found["check_kl_old"] <= (1e-8 if tight else 1e-3), (actors, learner, found)
            assert agreement_problem(found, actors, learner) is None


def test_another_sampling_config_or_other_weights_stop_the_stage(sampled):
    model, batches = sampled
    batch = batches["float32"]
    with precision.using("float32"):
        whole = check_agreement(learner_log_probs(model, batch, SamplingConfig()), batch, with_reference=False)
        problem = agreement_problem(whole, "float32/cpu", "float32/cpu")
        assert problem is not None and "another config (top_k" in problem and "check_kl" not in whole
        other = SmartTiny(ModelConfig.preset("test"), model.vocab).eval()  # fresh weights
        found = check_agreement(learner_log_probs(other, batch, SAMPLING), batch, with_reference=False)
    # a resumed run (the policy is no longer the reference): the KL to pi_old still tells
    assert "check_kl" not in found and agreement_problem(found, "float32/cpu", "float32/cpu") is not None, found


def test_rollouts_of_other_numerics_get_the_learners_log_probs(sampled):
    """A batch of bfloat16 actors before a float32 learner: log pi_ref is left to the learner and,
    under the clipped objective, log pi_old is recomputed with the weights each scene was sampled
    with (a stale scene: the previous version's); a batch of the learner's own numerics is kept."""
    model, batches = sampled
    older = SmartTiny(ModelConfig.preset("test"), model.vocab).eval()  # the weights of version 0
    one = batches["bfloat16"]
    two = ExperienceBatch(scenes=collate([one.scenes, one.scenes]), tokens=one.tokens.repeat(2, 1, 1, 1),
                          poses=one.poses.repeat(2, 1, 1, 1, 1), old_log_probs=one.old_log_probs.repeat(2, 1, 1, 1),
                          rewards=one.rewards.repeat(2, 1), versions=torch.tensor([0, 1]),
                          ref_log_probs=one.ref_log_probs.repeat(2, 1, 1, 1))
    stage = MPOStage(name="rft", sampling=SAMPLING)
    with precision.using("float32"):
        own = precision.numerics("cpu")
        kept = in_learner_numerics(two, {own}, own, 1, stage, {0: older, 1: model}.get)
        assert kept is two
        out = in_learner_numerics(two, {"bfloat16/cpu"}, own, 1, stage, {0: older, 1: model}.get)
        assert out.ref_log_probs is None
        assert torch.equal(out.old_log_probs[0], learner_log_probs(older, two, SAMPLING)[0])
        assert torch.equal(out.old_log_probs[1], learner_log_probs(model, two, SAMPLING)[1])
        assert not torch.equal(out.old_log_probs, two.old_log_probs)
        fresh = dataclasses.replace(two, versions=torch.tensor([1, 1]))  # on-policy, used once: MPO-2, no ratio
        on_policy = in_learner_numerics(fresh, {"bfloat16/cpu"}, own, 1, stage, {1: model}.get)
        assert on_policy.ref_log_probs is None and torch.equal(on_policy.old_log_probs, fresh.old_log_probs)
