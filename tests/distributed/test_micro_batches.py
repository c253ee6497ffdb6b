"""A BC / CAT-K SFT batch over its memory budget is cut into micro-batches whose gradients add up to
the batch's: the budget is respected and the step is the unsplit one (issue 27)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from smart_r1.config import BCStage, CatKStage
from smart_r1.distributed.memory_estimate import (
    GiB, activation_budget, batch_splitter, model_costs, supervised_fits, with_margin,
)
from smart_r1.distributed.supervised_loop import combined, step_losses
from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.rl.optim import accumulated_step
from smart_r1.tokens.motion_vocab import build_vocab
from smart_r1.tokens.scene import build_scene, collate, micro_batches, scene_size

# float32; a scene in a smaller micro-batch is padded less: the nearest-neighbour choice can differ
# where two map segments are equally near (tests/rl/test_mpo_reuse.py), relative to the gradient
PAD_RTOL = 1e-3


@pytest.fixture(scope="module", autouse=True)
def _float32(float32_forward):
    """Identities checked in float32, on any processor."""


@pytest.fixture(scope="module")
def scenes(womd_record):
    """Four scenes of different sizes (agents, map segments) cut from the real WOMD scenario, a
    tiny model without dropout (so that its gradient is a function of the batch)."""
    torch.manual_seed(0)
    vocab = build_vocab([womd_record], size=64, seed=0)
    model = SmartTiny(ModelConfig.preset("test", vocab_size=64, dropout=0.0), vocab)
    out = [build_scene(womd_record, vocab, agents="sim", max_agents=a, max_map_segments=m)
           for a, m in ((4, 48), (16, 128), (8, 64), (12, 96))]
    assert len({scene_size(s) for s in out}) == 4
    return model, out


def test_micro_batches_keep_every_scene_within_the_budget(scenes):
    _, batch = scenes
    cost = lambda n, a, m: n * (10 * a + m)  # noqa: E731
    whole = cost(len(batch), *map(max, zip(*(scene_size(s) for s in batch))))
    assert micro_batches(batch, cost, whole) == [batch]  # fits: the batch as it is
    for budget in (whole - 1, 700, 10):
        groups = micro_batches(batch, cost, budget)
        assert sorted(id(s) for g in groups for s in g) == sorted(id(s) for s in batch)
        for g in groups:
            a, m = map(max, zip(*(scene_size(s) for s in g)))
            assert cost(len(g), a, m) <= budget or len(g) == 1
        assert len(groups) > 1
    assert len(micro_batches(batch, cost, 10)) == len(batch)  # every scene above it: one each


@pytest.mark.parametrize("stage", [
    BCStage(name="bc", label_smoothing=0.1),
    CatKStage(name="sft", catk_k=3, bc_weight=2.0, anchor_weight=1.0, label_smoothing=0.1),
])
def test_micro_batches_give_the_whole_batch_gradient(scenes, stage):
    model, batch = scenes
    anchor = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in anchor.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def step(groups):
        net = copy.deepcopy(model).train()
        grads = {}

        class Recorder(torch.optim.SGD):  # applies nothing, keeps the gradient
            def step(self, closure=None):
                grads.update({n: p.grad.clone() for n, p in net.named_parameters()})

        stats: list[dict] = []
        accumulated_step(net, Recorder(net.parameters(), lr=0.0),
                         step_losses(net, stage, [collate(g) for g in groups], anchor, stats), 1e9)
        for s in stats:
            s.pop("forward_s")
        return grads, combined(stats)

    whole, whole_stats = step([batch])
    split, split_stats = step([batch[:1], batch[1:3], batch[3:]])
    assert split_stats["tokens"] == whole_stats["tokens"] > 0
    for k in ("loss", "accuracy"):
        assert split_stats[k] == pytest.approx(whole_stats[k], rel=1e-3, abs=1e-4), k
    scale = max(float(g.abs().max()) for g in whole.values())
    worst = max(float((split[n] - whole[n]).abs().max()) for n in whole)
    assert scale > 0 and worst <= PAD_RTOL * scale, worst / scale


def test_a_stage_budget_splits_a_batch_into_micro_batches_that_fit(scenes):
    """batch_splitter: each micro-batch's estimated step (weights, optimiser state, activations,
    margin) within memory_budget_gb; without a budget, the whole batch."""
    model, batch = scenes
    stage = CatKStage(name="sft", catk_k=3, bc_weight=1.0)
    assert batch_splitter(stage, model.cfg, "cpu")(batch) == [batch]
    costs = model_costs(model.cfg, "float32")
    fixed, agent, segment = supervised_fits(stage, costs)
    one = max(agent * a + segment * m for a, m in map(scene_size, batch))  # the largest scene alone
    budget_gb = with_margin(fixed + 2.5 * one, gpu=False) / GiB  # room for two or three scenes, not four
    groups = batch_splitter(dataclasses.replace(stage, memory_budget_gb=budget_gb), model.cfg, "cpu")(batch)
    assert 1 < len(groups) < len(batch)
    room = activation_budget(budget_gb * GiB, fixed, gpu=False)
    for g in groups:
        a, m = map(max, zip(*(scene_size(s) for s in g)))
        assert len(g) * (agent * a + segment * m) <= room
