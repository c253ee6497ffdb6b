"""SMART-tiny: parameter count, cached slot-by-slot decoding equal to the full causal pass,
checkpoints that load with weights_only and refuse a mismatched config or vocabulary."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from smart_r1.model.checkpoint import load_checkpoint, save_checkpoint
from smart_r1.model.config import ModelConfig
from smart_r1.model.smart_tiny import NUM_SLOTS, SmartTiny, teacher_inputs
from smart_r1.tokens.motion_vocab import NUM_TYPES, SHIFT, MotionVocab, build_vocab
from smart_r1.tokens.scene import build_scene, collate


@pytest.fixture(scope="module")
def vocab(womd_record):
    return build_vocab([womd_record], size=ModelConfig.preset("test").vocab_size, iters=3)


@pytest.fixture(scope="module")
def scene(womd_record, vocab):
    return build_scene(womd_record, vocab, max_agents=32, max_map_segments=256)


def test_default_config_is_smart_tiny():
    """SMART-tiny's decoder layout (6 agent layers, 3 map layers, width 128, radii 10 / 30 / 60 m,
    3 s temporal span); our leaner attention blocks count 5.5M where SMART's count 7M."""
    cfg = ModelConfig()
    assert (cfg.agent_blocks, cfg.map_layers, cfg.dim, cfg.num_heads) == (6, 3, 128, 8)
    assert (cfg.map_radius, cfg.agent_map_radius, cfg.agent_radius, cfg.time_window) == (10.0, 30.0, 60.0, 7)
    model = SmartTiny(cfg, MotionVocab(torch.zeros(NUM_TYPES, cfg.vocab_size, SHIFT, 3)))
    n = model.num_parameters()
    print(f"SMART-tiny default: {n:,} parameters")
    assert 5_000_000 <= n <= 8_000_000


def test_cached_decoding_equals_the_full_causal_pass(scene, vocab):
    torch.manual_seed(0)
    model = SmartTiny(ModelConfig.preset("test"), vocab).eval()
    batch = collate([scene, scene])
    with torch.no_grad():
        full = model(batch)  # [B, A, 17, V]
        ctx = model.encode_map(batch)
        tokens, pose, valid = teacher_inputs(batch)
        cache = model.new_cache(2, tokens.shape[1])
        steps = [model.decode(ctx, tokens[:, :, i:i + 1], batch.agent_type, pose[:, :, i:i + 1], valid[:, :, i:i + 1],
                              start=i, cache=cache) for i in range(NUM_SLOTS)]
    assert full.shape == (2, tokens.shape[1], NUM_SLOTS, vocab.size)
    assert torch.allclose(torch.cat(steps, 2), full, atol=1e-4)
    # causality: changing a later slot's token leaves earlier logits untouched
    changed = dataclasses.replace(batch, tokens=batch.tokens.clone())
    changed.tokens[:, :, 10] = (changed.tokens[:, :, 10] + 1) % vocab.size
    with torch.no_grad():
        again = model(changed)
    assert torch.allclose(again[:, :, :10], full[:, :, :10], atol=1e-5)
    assert not torch.allclose(again[:, :, 10:], full[:, :, 10:], atol=1e-5)


def test_checkpoint_round_trip_and_mismatches(tmp_path, scene, vocab):
    cfg = ModelConfig.preset("test")
    model = SmartTiny(cfg, vocab).eval()
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, {"stage": "bc"})
    blob = torch.load(path, weights_only=True)  # plain dicts and tensors only
    assert blob["model_config"]["dim"] == cfg.dim
    loaded = load_checkpoint(path, expect_config=cfg, expect_vocab=vocab)
    with torch.no_grad():
        assert torch.equal(loaded(scene), model(scene))

    with pytest.raises(ValueError, match="another model config"):
        load_checkpoint(path, expect_config=dataclasses.replace(cfg, dim=64))
    other = MotionVocab(vocab.contours + 0.5)
    with pytest.raises(ValueError, match="another motion vocabulary"):
        load_checkpoint(path, expect_vocab=other)
    blob["model_config"]["vocab_size"] = 2 * cfg.vocab_size  # config says 128 tokens, weights/vocab 64
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="tokens per type"):
        load_checkpoint(tmp_path / "bad.pt")
    blob["model_config"]["vocab_size"] = cfg.vocab_size
    blob["model_config"]["dim"] = 48
    torch.save(blob, tmp_path / "bad2.pt")
    with pytest.raises(ValueError, match="weights do not fit"):
        load_checkpoint(tmp_path / "bad2.pt")
    with pytest.raises(ValueError, match="vocabulary has"):
        SmartTiny(dataclasses.replace(cfg, vocab_size=32), vocab)
