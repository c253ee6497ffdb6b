"""Named phase timers: every phase of a training step (rollout, reward, update, sync) is timed."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager


class PhaseTimer:
    """Accumulates wall time per phase name; `lap()` returns and resets the current totals."""

    def __init__(self) -> None:
        self._totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._totals[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        self._totals[name] += seconds

    def lap(self) -> dict[str, float]:
        out = {f"time_{k}_s": round(v, 4) for k, v in self._totals.items()}
        self._totals.clear()
        return out


def format_phases(times: dict[str, float]) -> str:
    return " ".join(f"{k[5:-2]}={v:.2f}s" for k, v in times.items())
