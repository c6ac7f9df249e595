"""Throughput and FLOP utilisation: peak FLOP/s by device, and the callback that logs MFU/HFU per optimiser step.

    trainer = L.Trainer(..., callbacks=[PerfMonitor(peak_tflops=None)])

``peak_flops`` gives the dense (no structured sparsity) tensor-core peak of the GPU for the run's precision from
vendor datasheet figures (:data:`GPU_PEAKS`), an override (``trainer.peak_tflops``), or on CPU a measured fp32 matmul
peak at the thread count in use (cached per process). MFU = model FLOPs (:mod:`mllm_kit.flops`: vision encoder,
connector, LLM and head, backward included, recomputation excluded) / step time / peak; HFU counts recomputation too.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from mllm_kit.batch import Batch
from mllm_kit.flops import FlopCount, StepFlops, Units
from mllm_kit.log import get_logger
from mllm_kit.objectives.base import Objective
from mllm_kit.objectives.head import CHUNK_SIZE

log = get_logger(__name__)


@dataclass(frozen=True)
class Peak:
    """Dense peak TFLOP/s by math mode (None: no such mode on the device) and where the figures come from."""

    bf16: float | None
    fp16: float | None
    tf32: float | None
    fp32: float
    source: str


_SXM = "NVIDIA H100 / H200 datasheets (SXM; sparse figures halved)"
# (name, pattern on torch.cuda.get_device_name(), peak); the first match wins, so specific names come first.
GPU_PEAKS: list[tuple[str, str, Peak]] = [
    ("H100 NVL", r"H100.*NVL", Peak(835.5, 835.5, 417.5, 60.0, "NVIDIA H100 NVL datasheet (1,671 / 835 TFLOPS sparse)")),
    ("H100 PCIe", r"H100.*PCIE", Peak(756.5, 756.5, 378.0, 51.2, "NVIDIA H100 PCIe datasheet (1,513 / 756 TFLOPS sparse)")),
    ("H100 SXM", r"H100", Peak(989.4, 989.4, 494.7, 66.9, _SXM)),
    ("H200 NVL", r"H200.*NVL", Peak(835.5, 835.5, 417.5, 60.0, "NVIDIA H200 NVL datasheet (1,671 / 835 TFLOPS sparse)")),
    ("H200 SXM", r"H200", Peak(989.4, 989.4, 494.7, 66.9, _SXM)),
    ("H800 PCIe", r"H800.*PCIE", Peak(756.5, 756.5, 378.0, 51.2, "NVIDIA H800 PCIe datasheet (as H100 PCIe)")),
    ("H800 SXM", r"H800", Peak(989.4, 989.4, 494.7, 66.9, "NVIDIA H800 SXM datasheet (as H100 SXM)")),
    ("A800", r"A800", Peak(312.0, 312.0, 156.0, 19.5, "NVIDIA A800 datasheet (as A100)")),
    ("A100", r"A100", Peak(312.0, 312.0, 156.0, 19.5, "NVIDIA A100 datasheet (SXM4 and PCIe; 624 / 312 TFLOPS sparse)")),
    ("L40S", r"L40S", Peak(362.05, 362.05, 183.0, 91.6, "NVIDIA L40S datasheet (733 / 366 TFLOPS sparse)")),
    ("RTX 4090", r"RTX 4090", Peak(165.2, 165.2, 82.6, 82.6, "NVIDIA Ada whitepaper, GeForce RTX 4090 (FP32 accumulate)")),
    ("A10G", r"A10G", Peak(70.0, 70.0, 35.0, 35.0, "AWS A10G: no NVIDIA datasheet; AWS/NVIDIA figures as commonly quoted, "
                                                     "set trainer.peak_tflops if you have better")),
    ("V100S PCIe", r"V100S", Peak(None, 130.0, None, 16.4, "NVIDIA V100S datasheet (no BF16/TF32 tensor cores)")),
    ("V100 SXM2", r"V100.*SXM", Peak(None, 125.0, None, 15.7, "NVIDIA V100 datasheet, SXM2 (no BF16/TF32 tensor cores)")),
    ("V100 PCIe", r"V100", Peak(None, 112.0, None, 14.0, "NVIDIA V100 datasheet, PCIe (no BF16/TF32 tensor cores)")),
]


def gpu_peak(device_name: str) -> tuple[str, Peak] | None:
    """The table entry for a CUDA device name (``torch.cuda.get_device_name()``), or None."""
    for name, pattern, peak in GPU_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return name, peak
    return None


def math_mode(precision: str | int | None) -> str:
    """The table column a Lightning ``precision`` computes its matmuls in: bf16, fp16, tf32 (fp32 with TF32 matmuls
    allowed) or fp32."""
    p = str(precision if precision is not None else "32-true").lower()
    if "bf16" in p:
        return "bf16"
    if p.startswith("16") or "fp16" in p or p == "half":
        return "fp16"
    tf32 = torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "fp32"


@functools.cache
def _cpu_matmul_peak(threads: int, size: int, seconds: float) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    for _ in range(2):
        torch.mm(a, b, out=out)
    best, spent, runs = float("inf"), 0.0, 0
    while spent < seconds or runs < 3:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return 2 * size ** 3 / best


def cpu_peak_flops(size: int = 1024, seconds: float = 0.25) -> float:
    """Measured fp32 FLOP/s of a square ``size`` matmul at ``torch.get_num_threads()`` (the fastest of a ~``seconds``
    loop; once per process and thread count)."""
    return _cpu_matmul_peak(torch.get_num_threads(), size, seconds)


@dataclass(frozen=True)
class PeakFlops:
    flops: float | None  # FLOP/s; None: unknown device or math mode
    source: str


def peak_flops(device: torch.device | str | None = None, precision: str | int | None = None,
               peak_tflops: float | None = None) -> PeakFlops:
    """Peak FLOP/s of one device: ``peak_tflops`` (``trainer.peak_tflops``) when given; a CUDA device's dense datasheet
    figure for ``precision``'s math mode; on CPU the measured fp32 matmul peak."""
    if peak_tflops:
        return PeakFlops(float(peak_tflops) * 1e12, "trainer.peak_tflops")
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = gpu_peak(name)
        mode = math_mode(precision)
        if found is None:
            return PeakFlops(None, f"{name!r} is not in mllm_kit.training.perf.GPU_PEAKS; set trainer.peak_tflops")
        entry, peak = found
        value = getattr(peak, mode)
        if value is None:
            return PeakFlops(None, f"{entry} has no {mode} tensor cores ({peak.source})")
        return PeakFlops(value * 1e12, f"{entry} {mode} dense: {peak.source}")
    if device.type == "cpu":
        return PeakFlops(cpu_peak_flops(), f"measured fp32 matmul, {torch.get_num_threads()} threads")
    return PeakFlops(None, f"no peak for device type {device.type!r}; set trainer.peak_tflops")


class PerfMonitor(L.Callback):
    """Logs per optimiser step (every ``every_n_steps``; default: the trainer's ``log_every_n_steps``):

    ``perf/step_s``, ``perf/tokens_per_s`` and ``perf/samples_per_s`` (non-padding positions and sequences, this
    rank's × the world size), ``perf/tflops`` (this device's model FLOPs / step time), ``perf/mfu``, ``perf/hfu``
    (when the step recomputes anything: activation checkpointing, chunked LM head), ``perf/padding_waste`` (padded
    positions / all positions of the step's micro-batches) and ``perf/mfu_llm_only`` (MFU if vision were not counted).

    Everything is computed on the host: FLOPs from the model's structure (analysed once, at ``on_train_start``) and the
    batch's host-side counts (shapes, ``row_lengths``, ``seq_lens``, ``num_loss_tokens``); time from the host clock
    between the ends of consecutive optimiser steps (validation excluded; a checkpoint write or an in-training
    benchmark lands in the step after it). No device tensor is read and no sync is added, so on a GPU a single step's
    time is the host's view of an asynchronous queue — read the metrics over a window of steps.

    ``peak_tflops`` overrides the device's peak (``trainer.peak_tflops``); ``every_n_steps`` the logging cadence;
    ``head_rows(batch)`` the rows the LM head runs on (default: the batch's supervised targets, what mllm-kit's
    objectives gather). A component without a FLOP formula is counted approximately (a warning names it); a model
    that cannot be analysed turns the metrics off with a warning, never the run.
    """

    def __init__(self, peak_tflops: float | None = None, every_n_steps: int | None = None,
                 head_rows: Callable[[Batch], int] | None = None) -> None:
        self.peak_tflops = peak_tflops
        self.every_n_steps = every_n_steps
        self.head_rows = head_rows
        self.peak: PeakFlops | None = None
        self.last: dict[str, float] = {}
        self._student: StepFlops | None = None
        self._teacher: StepFlops | None = None
        self._counts: dict[Any, FlopCount] = {}
        self._multi_pass = False
        self._reset()
        self._step, self._start = 0, None

    def _reset(self) -> None:
        self._flops, self._positions, self._real, self._sequences = FlopCount(), 0, 0, 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        objective = getattr(pl_module, "objective", None)
        teacher = getattr(pl_module, "teacher", None)
        try:
            self._student = StepFlops(model, strict=False, head_chunk=getattr(objective, "chunk_size", None) or CHUNK_SIZE)
            self._teacher = StepFlops(teacher.model, trainable=False, strict=False) if teacher is not None else None
        except Exception as err:  # noqa: BLE001  never stop a run over its metrics
            log.warning("perf: cannot count this model's FLOPs (%s: %s); perf/ metrics are off for this stage.",
                        type(err).__name__, err)
            self._student = self._teacher = None
            return
        for what in self._student.approximate:
            log.warning("perf: no FLOP formula for the %s; MFU counts it approximately (every parameter once per token).", what)
        self.peak = peak_flops(pl_module.device, trainer.precision, self.peak_tflops)
        log.info("perf: peak %s (%s)", f"{self.peak.flops / 1e12:.2f} TFLOP/s" if self.peak.flops else "unknown", self.peak.source)
        self._multi_pass = objective is not None and type(objective).passes is not Objective.passes
        self._step, self._start = trainer.global_step, None
        self._reset()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None:  # validation runs between optimiser steps: not part of the next step's time
            self._start = time.perf_counter()

    def _count(self, counter: StepFlops, batch: Batch) -> FlopCount:
        rows = self.head_rows(batch) if self.head_rows is not None else None
        units = counter.units(batch, rows)
        key = (id(counter), units)
        if key not in self._counts:
            if len(self._counts) > 4096:
                self._counts.clear()
            self._counts[key] = counter.count(units)
        return self._counts[key]

    def _batch_flops(self, pl_module: L.LightningModule, batch: Batch) -> FlopCount:
        # A multi-pass objective (Matryoshka: one pass per token scale) runs the model once per pass batch; building
        # them costs a few index operations on the device, no sync. The connector's FLOPs do not depend on the pass.
        passes = pl_module.objective.passes(batch, pl_module.model) if self._multi_pass else None
        total = FlopCount()
        for pass_batch in [p.batch for p in passes] if passes else [batch]:
            total = total + self._count(self._student, pass_batch)
            if self._teacher is not None:  # its forward on its own view, as parts "teacher.encoder", ...
                teacher = self._count(self._teacher, pass_batch.teacher_view())
                total = total + FlopCount({f"teacher.{name}": part for name, part in teacher.parts.items()})
        return total

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._student is None:
            return
        batch = getattr(batch, "batch", batch)  # a StepBatch carries the micro-batch
        units: Units = self._student.units(batch)
        self._flops = self._flops + self._batch_flops(pl_module, batch)
        self._positions += units.tokens
        self._real += units.real_tokens
        self._sequences += units.sequences
        if trainer.global_step == self._step:
            return  # the optimiser step is not finished (gradient accumulation)
        now = time.perf_counter()
        elapsed = max(now - (self._start or now), 1e-9)
        self._step, self._start = trainer.global_step, now
        self.last = self.metrics(elapsed, trainer.world_size)
        self._reset()
        every = self.every_n_steps or trainer.log_every_n_steps or 1
        if trainer.is_global_zero and trainer.global_step % every == 0:
            for logger in trainer.loggers:
                logger.log_metrics(self.last, step=trainer.global_step)

    def metrics(self, seconds: float, world_size: int = 1) -> dict[str, float]:
        """The step's metrics from what was accumulated over its micro-batches and its wall time."""
        flops = self._flops
        out = {
            "perf/step_s": seconds,
            "perf/tokens_per_s": self._real * world_size / seconds,
            "perf/samples_per_s": self._sequences * world_size / seconds,
            "perf/tflops": flops.model_flops / seconds / 1e12,
            "perf/padding_waste": 1.0 - self._real / self._positions if self._positions else 0.0,
        }
        peak = self.peak.flops if self.peak is not None else None
        if peak:
            out["perf/mfu"] = flops.model_flops / seconds / peak
            out["perf/mfu_llm_only"] = flops.without_vision.model_flops / seconds / peak
            if flops.recompute > 0:
                out["perf/hfu"] = flops.hardware_flops / seconds / peak
        return out
