"""The RFT stage's first-step check of the actors' log-probs against the learner's
(smart_r1.distributed.mpo_loop): at the sampling weights they agree up to the numerics, within
the stage's tolerance across float32 and bfloat16, and a mismatch of sampling config or weights is
stopped with a message that names it. Without Ray: the functions the learner loop calls."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from smart_r1.config import SamplingConfig
from smart_r1.data.index import scenario_index
from smart_r1.distributed.mpo_loop import agreement_problem, check_agreement, learner_log_probs
from smart_r1.model import precision
from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.rl.experience import collate_experiences, make_experience, reference_log_probs
from smart_r1.rl.rewards import RewardConfig
from smart_r1.rollout.closed_loop import closed_loop
from smart_r1.rollout.sampling import Sampler
from smart_r1.tokens.motion_vocab import build_vocab
from smart_r1.tokens.scene import build_scene

SAMPLING = SamplingConfig(top_k=8)


@pytest.fixture(scope="module")
def setting(sumo_shards):
    index = scenario_index(str(sumo_shards))
    records = index.read([0, 1])
    torch.manual_seed(0)
    model = SmartTiny(ModelConfig.preset("test"), build_vocab(records, size=ModelConfig.preset("test").vocab_size,
                                                              iters=3)).eval()
    return model, records


def _batch(model, records, actor_precision: str, sampling: SamplingConfig = SAMPLING):
    """An RL batch as rollout actors computing in `actor_precision` send it (with log pi_ref)."""
    experiences = []
    with precision.using(actor_precision):
        for i, record in enumerate(records):
            scene = build_scene(record, model.vocab, agents="sim")
            torch.manual_seed(i)
            tensors = closed_loop(model, scene, 4, Sampler(**dataclasses.asdict(sampling)))
            ref = reference_log_probs(model, scene, tensors, sampling)
            experiences.append(make_experience(i, record, scene, tensors, 0, RewardConfig(), ref_log_probs=ref,
                                               numerics=precision.numerics("cpu")))
    return collate_experiences(experiences)


@pytest.mark.parametrize("actors,learner", [("float32", "float32"), ("bfloat16", "float32"),
                                            ("float32", "bfloat16"), ("bfloat16", "bfloat16")])
def test_the_actors_agree_with_the_learner_at_the_sampling_weights(setting, actors, learner):
    model, records = setting
    batch = _batch(model, records, actors)
    with precision.using(learner):
        found = check_agreement(learner_log_probs(model, batch, SAMPLING), batch, with_reference=True)
    tight = actors == learner == "float32"
    assert found["check_ratio"] == pytest.approx(1.0, abs=1e-5 if tight else 0.02)
    assert 0.0 <= found["check_kl"] <= (1e-8 if tight else 1e-3)
    assert agreement_problem(found, actors, learner) is None


def test_another_sampling_config_or_other_weights_stop_the_stage(setting):
    model, records = setting
    with precision.using("float32"):
        batch = _batch(model, records, "float32")
        whole = check_agreement(learner_log_probs(model, batch, SamplingConfig()), batch, with_reference=False)
        problem = agreement_problem(whole, "float32/cpu", "float32/cpu")
        assert problem is not None and "another config (top_k" in problem and "check_kl" not in whole
        other = SmartTiny(ModelConfig.preset("test"), model.vocab).eval()  # fresh weights
        found = check_agreement(learner_log_probs(other, batch, SAMPLING), batch, with_reference=True)
    assert agreement_problem(found, "float32/cpu", "float32/cpu") is not None, found
