"""Reduced precision: detection and the config switch, the bfloat16 forward against the float32
reference on the real scene, and rollout log-probs against the learner's recomputation.

bfloat16 autocast runs on any CPU (emulated where the processor lacks it, ~100x slower), so these
tests use the `test` preset and a few hundred map segments to stay within seconds everywhere."""

from __future__ import annotations

import pytest
import torch

from smart_r1.config import PRECISIONS, ModelSection
from smart_r1.model import precision
from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny, teacher_targets
from smart_r1.rl.bc import bc_loss
from smart_r1.rollout.closed_loop import closed_loop, token_log_probs
from smart_r1.rollout.sampling import Sampler
from smart_r1.tokens.motion_vocab import build_vocab
from smart_r1.tokens.scene import build_scene

# bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%); through the decoder the
# logits' errors add up to a few hundredths of a nat on this scene (measured: mean 0.006, worst
# 0.043, top-1 always equal). The bounds leave 3-4x room for other processors and thread counts:
BF16_MEAN_NATS = 0.02  # mean |log p_bf16 - log p_fp32| over valid slots and the whole vocabulary
BF16_MAX_NATS = 0.15  # worst entry (a 16% change of one token's probability)
BF16_TOP1_AGREEMENT = 0.95
# Rollouts (KV cache, one slot per step) against the learner's teacher-forced recomputation under
# the same precision: float32 differs by summation order only (measured 1e-6); bfloat16 rounds
# the same inputs the same way (measured 0), bounded as the bf16 forward above.
SAME_PRECISION_MAX_NATS = {"float32": 1e-4, "bfloat16": BF16_MAX_NATS}


@pytest.fixture(scope="module")
def model_and_vocab(womd_record):
    torch.manual_seed(0)
    vocab = build_vocab([womd_record], size=64, seed=0)
    model = SmartTiny(ModelConfig.preset("test", vocab_size=64, dropout=0.0), vocab).eval()
    with torch.no_grad():  # sharper next-token distributions, more like a trained model's
        model.decoder.head[-1].weight.mul_(8.0)
    return model, vocab


def test_auto_is_bfloat16_only_where_the_device_has_it(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.compute_dtype("cpu", "auto") == torch.float32
    with precision.autocast("cpu", "auto"):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.compute_dtype("cpu", "auto") == torch.bfloat16
    with precision.autocast("cpu", "auto"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert precision.compute_dtype("cpu", "float32") == torch.float32
    assert precision.compute_dtype("cpu", "bfloat16") == torch.bfloat16


def test_process_precision_from_environment_and_switch(monkeypatch):
    monkeypatch.setenv(precision.ENV_VAR, "float32")
    assert precision.get_precision() == "float32"
    with precision.using("bfloat16"):
        assert precision.get_precision() == "bfloat16"
        assert precision.compute_dtype("cpu") == torch.bfloat16
    assert precision.get_precision() == "float32"
    monkeypatch.setenv(precision.ENV_VAR, "half")
    with pytest.raises(ValueError, match="precision"):
        precision.get_precision()
    with pytest.raises(ValueError, match="precision"):
        ModelSection(precision="fp16").validate()
    assert precision.PRECISIONS == PRECISIONS == ("auto", "float32", "bfloat16")


def test_bfloat16_forward_matches_float32_on_the_real_scene(model_and_vocab, womd_record):
    model, vocab = model_and_vocab
    scene = build_scene(womd_record, vocab, agents="all", max_agents=32, max_map_segments=128)
    _, mask = teacher_targets(scene)
    with torch.no_grad():
        with precision.using("float32"), precision.autocast("cpu"):
            ref = model(scene).float().log_softmax(-1)[mask]  # [n, V]
        with precision.using("bfloat16"), precision.autocast("cpu"):
            low = model(scene)
        assert low.dtype == torch.bfloat16  # autocast really ran the head in bf16
        low = low.float().log_softmax(-1)[mask]
    diff = (low - ref).abs()
    assert diff.mean() < BF16_MEAN_NATS, diff.mean()
    assert diff.max() < BF16_MAX_NATS, diff.max()
    assert (low.argmax(-1) == ref.argmax(-1)).float().mean() >= BF16_TOP1_AGREEMENT
    # the loss the learner minimises agrees alike, and stays float32
    with torch.no_grad(), precision.using("float32"):
        loss_ref, _ = bc_loss(model, scene)
    with torch.no_grad(), precision.using("bfloat16"):
        loss_low, _ = bc_loss(model, scene)
    assert loss_low.dtype == torch.float32
    assert abs(float(loss_low) - float(loss_ref)) < BF16_MEAN_NATS


@pytest.mark.parametrize("name", ["float32", "bfloat16"])
def test_rollout_log_probs_match_the_learners_recomputation(model_and_vocab, womd_record, name):
    """MPO's ratio pi / pi_old compares the actors' log-probs with the learner's: under the same
    precision they must agree, or an on-policy batch would look off-policy."""
    model, vocab = model_and_vocab
    scene = build_scene(womd_record, vocab, agents="sim", max_map_segments=128)
    sampler = Sampler(top_k=8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), precision.using(name):
        out = closed_loop(model, scene, 1, sampler)
        again = token_log_probs(model, scene, out.tokens, out.poses, top_k=8)  # [1, 1, A, 16]
    live = (scene.sim_mask & scene.agent_mask)[:, None, :, None].expand_as(again)
    assert out.log_probs.dtype == again.dtype == torch.float32
    diff = (out.log_probs - again)[live].abs()
    assert diff.max() <= SAME_PRECISION_MAX_NATS[name], diff.max()
