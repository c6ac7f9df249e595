"""AdamW with per-module learning rates, no decay on norms/biases, and warmup + cosine/linear/constant."""

from __future__ import annotations

import math

import torch
from torch import nn

from mllm_kit.recipe import OptimSpec


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norm scales and other 1-D parameters (LayerNorm/RMSNorm weights, position scales) are not decayed.
    return param.ndim < 2 or "norm" in name.lower()


def _lr_for(name: str, spec: OptimSpec) -> float:
    best, best_len = spec.lr, -1
    for prefix, lr in spec.module_lr.items():
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = lr, len(prefix)
    return best


def param_groups(model: nn.Module, spec: OptimSpec) -> list[dict]:
    """Trainable parameters only (frozen ones get no optimiser state), grouped by (lr, decay)."""
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr, decay = _lr_for(name, spec), not _no_decay(name, param)
        group = groups.setdefault((lr, decay), {"params": [], "names": [], "lr": lr, "weight_decay": spec.weight_decay if decay else 0.0})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, spec: OptimSpec) -> torch.optim.Optimizer:
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, spec)]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, fused=None)


def lr_lambda(spec: OptimSpec, total_steps: int):
    """Multiplier of each group's base lr at optimiser step ``step`` (linear warmup, then the schedule)."""
    warmup = spec.warmup_steps if spec.warmup_steps is not None else math.ceil(spec.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if spec.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if spec.schedule == "cosine" else 1 - progress
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * shape

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, spec: OptimSpec, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total_steps))
