"""The model's faster formulations against their references: factored relative attention and the
embedding-lookup row gather give the same logits and gradients, in float32, on the real scene."""

from __future__ import annotations

import pytest
import torch

from smart_r1.model.config import ModelConfig
from smart_r1.model.layers import gather_rows, use_fast_paths
from smart_r1.model.smart_tiny import SmartTiny
from smart_r1.rl.bc import bc_loss
from smart_r1.tokens.motion_vocab import build_vocab
from smart_r1.tokens.scene import build_scene

# Both forms compute the same sums in another order: float32 rounding, measured 4e-7 on logits
# of size ~0.6 and 2e-5 relative on the worst parameter's gradient (any thread count).
LOGIT_ATOL = 1e-5
GRAD_RTOL = 1e-3

pytestmark = pytest.mark.usefixtures("float32_forward")  # "in float32", also where `auto` would be bf16


def _advanced_index(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """gather_rows as it was: advanced indexing."""
    b = torch.arange(src.shape[0]).view(-1, *([1] * (index.ndim - 1)))
    return src[b, index]


def test_gather_rows_equals_advanced_indexing_with_gradients():
    torch.manual_seed(0)
    for src_shape, index_shape in (((3, 7, 5), (3, 4, 2)), ((2, 7, 3), (2, 6)), ((2, 7), (2, 4))):
        src = torch.randn(*src_shape, requires_grad=True)
        index = torch.randint(0, src_shape[1], index_shape)
        out = gather_rows(src, index)
        ref = _advanced_index(src, index)
        assert torch.equal(out, ref)
        (g,) = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out)).sum(), src)
        (g_ref,) = torch.autograd.grad((ref * torch.arange(ref.numel()).view_as(ref)).sum(), src)
        torch.testing.assert_close(g, g_ref)
    shared = torch.randn(1, 7, 5).expand(6, 7, 5)  # one scene's rows seen by 6 rollouts (a view)
    index = torch.randint(0, 7, (6, 4))
    assert torch.equal(gather_rows(shared, index), _advanced_index(shared, index))


def test_fast_paths_match_the_reference_on_the_real_scene(womd_record):
    vocab = build_vocab([womd_record], size=64, seed=0)
    torch.manual_seed(0)
    model = SmartTiny(ModelConfig.preset("cpu", vocab_size=64, dropout=0.0), vocab)
    scene = build_scene(womd_record, vocab, agents="all", max_agents=32, max_map_segments=128)
    results = {}
    for fast in (False, True):
        use_fast_paths(model, fast)
        model.zero_grad()
        loss, _ = bc_loss(model, scene)
        loss.backward()
        with torch.no_grad():
            logits = model(scene)
        results[fast] = logits, float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}
    use_fast_paths(model, True)
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = results[False], results[True]
    assert (logits - ref_logits).abs().max() < LOGIT_ATOL
    assert abs(loss - ref_loss) < LOGIT_ATOL
    for name, g in grads.items():
        ref = ref_grads[name]
        assert (g - ref).norm() <= GRAD_RTOL * ref.norm() + 1e-12, name
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "rel_k" in n)  # the factored path trains rel_k
