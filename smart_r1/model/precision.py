"""Reduced precision for SMART-tiny's forward passes: which dtype a device computes in, and the one
autocast context that every forward path uses (BC and CAT-K losses, the MPO log-probs, closed-loop
rollouts).

A precision is one of
    auto      bfloat16 where the hardware computes it natively (a CUDA GPU with bf16; a CPU with
              AVX512-BF16 or AMX), float32 elsewhere. On a CPU without native bf16 the matmuls are
              emulated: 1.4 against 133 GFLOP/s in float32 on the AMD EPYC dev machine
              (BENCHMARKS.md), so `auto` never picks it there.
    float32   the reference path.
    bfloat16  always, even emulated (tests; a CPU whose flags the detection misses).

The process-wide choice comes from `set_precision` (or the `using` context), else from the
environment variable SMART_R1_PRECISION (a convenience for local tools and benchmarks), else
`auto`. A pipeline never relies on the environment: a process on another node inherits nothing
from the driver, so `model.precision` travels in each stage's spec and every process sets it
itself (the driver in `run_pipeline`, each learner from its `LearnerJob`, each rollout actor from
its constructor). Each process resolves `auto` on its own hardware, so a GPU learner and CPU
rollout actors each get what suits them; `numerics` names what a process resolved, so that the
learner can tell whether the actors' log-probs were computed as its own are.

Under autocast the matmuls run in bfloat16 and their outputs are bfloat16; losses, log-softmax
and sampling stay float32 (their callers take `logits.float()`), parameters and optimiser state
stay float32.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch

from smart_r1.config import PRECISIONS
ENV_VAR = "SMART_R1_PRECISION"
_chosen: str | None = None  # set_precision(); None: the environment, else "auto"


def check_precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    return name


@functools.lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(p is not None for p in probes):
        return any(bool(p()) for p in probes if p is not None)
    try:  # a torch without the probes: the kernel's flags (Linux)
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_native(device: torch.device | str) -> bool:
    """Whether `device` computes bfloat16 natively."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_bf16()
    return False


def get_precision() -> str:
    """The process-wide precision: `set_precision`'s, else $SMART_R1_PRECISION, else "auto"."""
    return _chosen or check_precision(os.environ.get(ENV_VAR) or "auto")


def set_precision(name: str | None) -> None:
    """Set the process-wide precision (None: back to the environment's / "auto")."""
    global _chosen
    _chosen = None if name is None else check_precision(name)


@contextlib.contextmanager
def using(name: str):
    """Run a block under another precision (benchmarks compare paths in one process)."""
    global _chosen
    before = _chosen
    set_precision(name)
    try:
        yield
    finally:
        _chosen = before


def compute_dtype(device: torch.device | str, precision: str | None = None) -> torch.dtype:
    """float32 or bfloat16: what the forward passes on `device` compute in under `precision`
    (None: the process-wide one)."""
    name = check_precision(precision or get_precision())
    if name == "auto":
        return torch.bfloat16 if bf16_native(device) else torch.float32
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def autocast(device: torch.device | str, precision: str | None = None):
    """The autocast context of a forward pass on `device` (disabled under float32)."""
    device = torch.device(device)
    dtype = compute_dtype(device, precision)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def numerics(device: torch.device | str, precision: str | None = None) -> str:
    """What forward passes on `device` compute in, as '<dtype>/<device type>' (e.g. 'bfloat16/cuda',
    'float32/cpu'): two processes with equal numerics compute the same log-probs of the same tokens
    up to the order of their kernels' sums."""
    dtype = compute_dtype(device, precision)
    return f"{str(dtype).removeprefix('torch.')}/{torch.device(device).type}"
