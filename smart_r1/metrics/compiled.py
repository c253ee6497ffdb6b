"""Opt-in `torch.compile` of the metrics' hot element-wise kernels.

The segment and box distance kernels are chains of ~20 element-wise ops over millions of
(point, segment) or (box, box) pairs; eager PyTorch runs each op as a separate pass over memory.
Compiled (TorchInductor), each chain becomes one fused loop: about 50x faster on CPU for the
road-edge search. The one-off compile costs tens of seconds (cached on disk afterwards), so it
is off by default: enable it in long-running processes (RL reward workers, benchmarks) with
`enable_compile()` or `SMART_R1_COMPILE_METRICS=1`. Fused float32 arithmetic may differ from
eager in the last bit, far below the 1e-3 agreement tolerance.
"""

from __future__ import annotations

import functools
import os

import torch

_enabled = os.environ.get("SMART_R1_COMPILE_METRICS", "") == "1"


def enable_compile(enabled: bool = True) -> None:
    """Switch compiled kernels on (or off) for this process."""
    global _enabled
    _enabled = enabled


def compile_enabled() -> bool:
    return _enabled


def hot_kernel(fn):
    """Run `fn` compiled (dynamic shapes, compiled on first use) when enabled, else eagerly."""
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if not _enabled:
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(*args, **kwargs)

    return call
