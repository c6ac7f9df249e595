"""What modules report during one forward: aux losses (MoE balance, z-loss; summed) and metrics (expert loads;
averaged), gathered per call by :class:`~mllm_kit.MLLM` — never left on a module."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def add_aux(into: dict[str, torch.Tensor], more: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum ``more``'s named aux losses into ``into`` (same name: added, as MoE layers' are over layers); returns ``into``."""
    for name, value in more.items():
        into[name] = into[name] + value if name in into else value
    return into


class Reports:
    """The aux losses (summed) and metrics (averaged over reports) modules give during one forward; :meth:`add` is the
    ``report`` callable a module with ``reports_aux = True`` receives."""

    def __init__(self) -> None:
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.metrics: dict[str, list[torch.Tensor]] = {}

    def add(self, aux_losses: Mapping[str, torch.Tensor] | None = None, metrics: Mapping[str, torch.Tensor] | None = None) -> None:
        add_aux(self.aux_losses, aux_losses or {})
        for name, value in (metrics or {}).items():
            self.metrics.setdefault(name, []).append(value)

    def mean_metrics(self) -> dict[str, torch.Tensor]:
        return {name: torch.stack(values).mean(dim=0) for name, values in self.metrics.items()}


def expert_metrics(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """A metric with one value per expert is logged as ``<name>_e<i>``."""
    return {f"{name}_e{i}": v for i, v in enumerate(value.unbind())} if value.dim() else {name: value}
