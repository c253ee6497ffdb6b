"""The optimiser step: a non-finite loss or gradient skips the update (weights untouched), and too
many in a row stop the stage with a clear error."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.rl.bc import bc_loss
from smart_r1.rl.optim import NonFiniteGuard, optimizer_step, warmup_cosine
from smart_r1.tokens.motion_vocab import build_vocab
from smart_r1.tokens.scene import build_scene


@pytest.fixture(scope="module")
def setup(womd_record):
    torch.manual_seed(0)
    vocab = build_vocab([womd_record], size=64, seed=0)
    return SmartTiny(ModelConfig.preset("test"), vocab), build_scene(womd_record, vocab)


def test_a_nan_batch_skips_the_update_and_a_good_one_applies(setup):
    model, batch = setup
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    poisoned = dataclasses.replace(batch, anchor_pose=batch.anchor_pose.clone().fill_(float("nan")))
    loss, _ = bc_loss(model, poisoned)
    norm = optimizer_step(model, optimizer, loss, grad_clip=1.0)
    assert not math.isfinite(norm)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "NaN reached the weights"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    loss, _ = bc_loss(model, batch)
    assert math.isfinite(optimizer_step(model, optimizer, loss, grad_clip=1.0))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_too_many_non_finite_updates_in_a_row_stop_the_stage():
    guard = NonFiniteGuard("stage bc", limit=2)
    assert guard.update(1.0, "step 0")
    assert not guard.update(float("nan"), "step 1") and not guard.update(float("inf"), "step 2")
    assert guard.update(0.5, "step 3")  # a finite one resets the count
    assert not guard.update(float("nan"), "step 4") and not guard.update(float("nan"), "step 5")
    with pytest.raises(FloatingPointError, match="stage bc: 3 updates in a row .* step 6"):
        guard.update(float("nan"), "step 6")
    assert guard.skipped == 5


def test_warmup_then_cosine_to_ten_percent():
    factors = [warmup_cosine(s, 1000) for s in range(1000)]
    assert factors[0] == pytest.approx(1 / 50) and factors[49] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b - 1e-12 for a, b in zip(factors[50:], factors[51:]))
