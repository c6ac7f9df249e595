"""Shared timing for the benchmarks: median wall times of callables run round-robin, with device synchronisation."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def _seconds(fn: Callable[[], None], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def seconds_each(fns: dict[str, Callable[[], None]], steps: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Wall seconds of each callable per round, run round-robin so that drift in the machine's speed (other load,
    clock changes) falls on all of them alike rather than on whichever ran last."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(steps + warmup):
        for name, fn in fns.items():
            elapsed = _seconds(fn, device)
            if i >= warmup:
                times[name].append(elapsed)
    return times


def median_ms_each(fns: dict[str, Callable[[], None]], steps: int, warmup: int, device: str) -> dict[str, float]:
    """Median milliseconds of each callable (:func:`seconds_each`)."""
    return {name: 1000 * statistics.median(t) for name, t in seconds_each(fns, steps, warmup, device).items()}


def timing_parser(doc: str | None, steps: int, warmup: int) -> argparse.ArgumentParser:
    """The options every timing benchmark takes: ``--device``, ``--steps`` (timed) and ``--warmup`` (untimed)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup)
    return parser
