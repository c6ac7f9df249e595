"""The benchmark harness's own logic (benchmarks/ is not a package: its scripts import each other by module name):
variants timed in processes of their own run round-robin, and a ratio or an MFU pairs a time with the FLOPs of the
batches that took it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import mfu
import train_step


def test_train_step_runs_its_variants_round_robin(monkeypatch, capsys):
    """One process per variant and round, alternating — not every round of one variant, then the other's."""
    order = []

    def fake_run(command, **kwargs):
        variant = command[command.index("--variant") + 1]
        order.append(variant)
        ms = {"transformers": 10.0, "mllm-kit": 8.0}[variant] * len(order)
        out = json.dumps({"variant": variant, "size": "tiny", "median_ms": ms, "peak_mb": 100.0, "params": 1000})
        return subprocess.CompletedProcess(command, 0, stdout=out + "\n", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--sizes", "tiny", "--repeats", "3"])
    train_step.main()
    assert order == ["transformers", "mllm-kit"] * 3
    # per round: transformers 10, 30, 50 ms and mllm-kit 16, 32, 48 ms; min / median of the rounds
    assert "transformers 10.0 / 30.0 ms, mllm-kit 16.0 / 32.0 ms, ratio 1.600 / 1.067" in capsys.readouterr().out


def test_a_failing_variant_stops_the_benchmark_with_its_stderr(monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 1, "", "out of memory"))
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--sizes", "tiny", "--repeats", "1"])
    with pytest.raises(SystemExit, match="(?s)transformers failed.*out of memory"):
        train_step.main()


def test_mfu_pairs_each_time_with_the_flops_of_the_same_batches():
    """Two batches of different sizes; each variant's fastest step is a different batch. Step times, ratios and MFU
    come from each process's total over the same batches, with that variant's own FLOP count."""
    counts = [{"model": 1e9, "llm_only": 0.8e9, "hf_model": 2e9, "hf_llm_only": 1.8e9, "tokens": 100, "positions": 120},
              {"model": 9e9, "llm_only": 8e9, "hf_model": 12e9, "hf_llm_only": 11e9, "tokens": 900, "positions": 1000}]
    def process(seconds: list[float], peak: float) -> dict:
        return {"seconds": seconds, "peak_mib": peak, "params": 7}

    runs = {"mllm-kit": [process([0.5, 3.5], 50.0), process([1.0, 5.0], 60.0)],
            "hf": [process([1.0, 4.0], 100.0), process([4.0, 6.0], 100.0)]}
    out = mfu.summarise("tiny", runs, counts, peak=1e10, peak_source="test")["variants"]
    ours, hf = out["mllm-kit"], out["hf"]
    assert ours["step_s"] == {"min": 2.0, "median": 2.5}  # (0.5 + 3.5) / 2 and the median of 2.0 and 3.0
    assert hf["step_s"] == {"min": 2.5, "median": 3.75}
    assert ours["vs_hf"]["step_s"] == pytest.approx({"min": 2.0 / 2.5, "median": 2.5 / 3.75})
    assert ours["vs_hf"]["peak_mib"] == pytest.approx({"min": 0.5, "median": 0.55})
    assert ours["mfu"]["max"] == pytest.approx(10e9 / 4.0 / 1e10)  # both batches' FLOPs over both batches' time
    assert hf["mfu"]["max"] == pytest.approx(14e9 / 5.0 / 1e10)  # transformers' own count: the head on every row
    assert hf["mfu_llm_only"]["median"] == pytest.approx((12.8e9 / 5.0 + 12.8e9 / 10.0) / 2 / 1e10)
    assert ours["tokens_per_s"]["max"] == pytest.approx(1000 / 4.0)
    assert ours["padding_waste"] == pytest.approx(1 - 1000 / 1120)
    with pytest.raises(SystemExit, match="timed 1 steps; 2 batches"):
        mfu.summarise("tiny", {"hf": [process([1.0], 1.0)]}, counts, 1e10, "test")
