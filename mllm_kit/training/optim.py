"""AdamW with per-module learning rates, no decay on norms/biases, and transformers' warmup + cosine/linear/constant schedules."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup, get_linear_schedule_with_warmup

from mllm_kit.config.recipe import OptimSpec


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norm scales and other 1-D parameters (LayerNorm/RMSNorm weights, position scales) are not decayed.
    return param.ndim < 2 or "norm" in name.lower()


def _lr_for(name: str, spec: OptimSpec) -> float:
    best, best_len = spec.lr, -1
    for prefix, lr in spec.module_lr.items():
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = lr, len(prefix)
    return best


def param_groups(model: nn.Module, spec: OptimSpec, extra: nn.Module | None = None) -> list[dict]:
    """Trainable parameters only (frozen ones get no optimiser state), grouped by (lr, decay). ``extra``: modules an
    objective trains beside the model, named ``objective.<name>`` (for ``module_lr``)."""
    groups: dict[tuple[float, bool], dict] = {}
    named = [*model.named_parameters(), *(extra.named_parameters(prefix="objective") if extra is not None else [])]
    for name, param in named:
        if not param.requires_grad:
            continue
        lr, decay = _lr_for(name, spec), not _no_decay(name, param)
        group = groups.setdefault((lr, decay), {"params": [], "names": [], "lr": lr, "weight_decay": spec.weight_decay if decay else 0.0})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, spec: OptimSpec, extra: nn.Module | None = None) -> torch.optim.Optimizer:
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, spec, extra)]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, fused=None)


def build_scheduler(optimizer: torch.optim.Optimizer, spec: OptimSpec, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' warmup schedules: linear warmup over ``warmup_steps`` (or ``warmup_ratio`` of the steps), then
    cosine (down to ``min_lr_ratio`` × lr), linear (to 0) or constant."""
    warmup = spec.warmup_steps if spec.warmup_steps is not None else math.ceil(spec.warmup_ratio * total_steps)
    if spec.schedule == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total_steps, min_lr_rate=spec.min_lr_ratio)
    if spec.schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)
