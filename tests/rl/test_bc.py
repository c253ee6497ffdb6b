"""BC: a few steps lower the teacher-forced next-token loss, and every parameter gets a gradient."""

from __future__ import annotations

import torch

from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.rl.bc import bc_loss, bc_train_step, make_optimizer
from smart_r1.tokens.motion_vocab import build_vocab
from smart_r1.tokens.scene import build_scene, collate


def test_bc_step_lowers_the_loss_and_reaches_every_parameter(womd_record):
    torch.manual_seed(0)
    vocab = build_vocab([womd_record], size=ModelConfig.preset("test").vocab_size, iters=3)
    batch = collate([build_scene(womd_record, vocab, max_agents=24, max_map_segments=256)])
    model = SmartTiny(ModelConfig.preset("test", dropout=0.0), vocab)

    loss, stats = bc_loss(model, batch)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not no_grad, f"parameters without a gradient: {no_grad}"
    assert stats["tokens"] > 100

    before = [p.detach().clone() for p in model.parameters()]
    optimizer, scheduler = make_optimizer(model, lr=3e-3, total_steps=10, warmup_steps=1)
    first = bc_train_step(model, optimizer, batch, scheduler=scheduler)
    for _ in range(4):
        last = bc_train_step(model, optimizer, batch, scheduler=scheduler)
    with torch.no_grad():
        after, _ = bc_loss(model.eval(), batch)
    assert float(after) < first["loss"] - 0.1
    assert last["loss"] < first["loss"]
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
