"""Shared timing for the benchmarks: wall times of callables run round-robin in one process, with device
synchronisation, and of variants run round-robin in processes of their own."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from collections.abc import Callable, Hashable

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


def processes_each(commands: dict[Hashable, list[str]], repeats: int,
                   env: dict[str, str] | None = None) -> dict[Hashable, list[dict]]:
    """Run every command once per round, in the same order, for ``repeats`` rounds, each time in a fresh process — so
    each variant's peak memory is its own, and drift in the machine's speed falls on all of them alike rather than on
    whichever ran last. Each command prints one JSON object as its last line of stdout; returns them per variant in
    round order. A command that fails stops the benchmark with its stderr."""
    results: dict[Hashable, list[dict]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if out.returncode:
                raise SystemExit(f"{name} failed (exit {out.returncode}): {' '.join(command)}\n{out.stderr[-4000:]}")
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def timing_parser(doc: str | None, steps: int, warmup: int) -> argparse.ArgumentParser:
    """The options every timing benchmark takes: ``--device``, ``--steps`` (timed) and ``--warmup`` (untimed)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=warmup)
    return parser


def reset_peak_memory(device: str) -> None:
    """Start counting peak memory from here: CUDA's allocator peak, or on Linux the process's peak RSS (VmHWM, reset
    through ``/proc/self/clear_refs``) — so loading and converting a model do not count toward a training step's peak."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: peak_memory_mib falls back to the lifetime peak
        pass


def peak_memory_mib(device: str) -> float:
    """Peak memory since :func:`reset_peak_memory`, MiB: CUDA max allocated, else VmHWM (the lifetime ``ru_maxrss``
    where ``/proc`` is missing)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
