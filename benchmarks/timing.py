"""Shared timing for the benchmarks: median wall time of a callable, with device synchronisation."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], None], steps: int, warmup: int, device: str) -> float:
    times = []
    for i in range(steps + warmup):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)
