"""Shared timing for the benchmarks: median wall time of a callable, with device synchronisation."""

from __future__ import annotations

import argparse
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


def timing_parser(doc: str | None, steps: int, warmup: int) -> argparse.ArgumentParser:
    """The options every timing benchmark takes: ``--device``, ``--steps`` (timed) and ``--warmup`` (untimed)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup)
    return parser
