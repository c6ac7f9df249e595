"""E independent MLPs stored as stacked weights: the experts of the MoE connector (CuMo) and of upcycled FFNs (MoE-LLaVA).

Routing groups each expert's tokens into one row block of an ``[E, C, in]`` buffer (:mod:`mllm_kit.layers.routing`);
these experts then run as one batched matmul per layer — no Python loop over experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mllm_kit.errors import ConfigError
from mllm_kit.layers.mlp import activation

Linear = tuple[torch.Tensor, torch.Tensor | None]  # (weight [out, in], bias [out] or None), as nn.Linear stores them


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[E, C, in] @ [E, in, out] (+ [E, out])``: every expert at once."""
    return torch.bmm(x, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, weight)


class ExpertMLP(nn.Module):
    """``forward(x [E, C, dims[0]]) -> [E, C, dims[-1]]``: layer i is ``x @ w{i} + b{i}``, with ``act`` between layers.

    ``gated`` adds a parallel up projection ``w_up`` to the first layer, ``act(x @ w0) * (x @ w_up)`` (the SwiGLU FFN
    of Llama/Qwen2/Mistral); gate and up stay separate matrices, so the backward pass concatenates no gradients.
    ``act``: a transformers activation name, or the module of the FFN being copied.
    """

    def __init__(self, num_experts: int, dims: Sequence[int], act: str | nn.Module = "gelu", gated: bool = False,
                 bias: bool | Sequence[bool] = True) -> None:
        super().__init__()
        if len(dims) < 2:
            raise ConfigError(f"experts need at least one layer (two widths), got dims {list(dims)}.")
        depth = len(dims) - 1
        biases = [bias] * depth if isinstance(bias, bool) else list(bias)
        self.num_experts, self.depth, self.gated = num_experts, depth, gated
        self.act = activation(act, "experts") if isinstance(act, str) else act
        shapes = [(f"{i}", a, b, biases[i]) for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))]
        if gated:
            shapes.append(("_up", dims[0], dims[1], biases[0]))
        for name, a, b, has_bias in shapes:
            self.register_parameter(f"w{name}", nn.Parameter(torch.empty(num_experts, a, b)))
            self.register_parameter(f"b{name}", nn.Parameter(torch.empty(num_experts, b)) if has_bias else None)
        self.reset_parameters()

    @classmethod
    def copies(cls, linears: Sequence[Linear], num_experts: int, act: str | nn.Module, up: Linear | None = None) -> ExpertMLP:
        """``num_experts`` exact copies of a dense MLP given by its Linear layers (and the up projection of a gated FFN)."""
        weights = [w for w, _ in linears]
        dims = [weights[0].shape[1], *(w.shape[0] for w in weights)]
        experts = cls(num_experts, dims, act, gated=up is not None, bias=[b is not None for _, b in linears])
        experts.to(device=weights[0].device, dtype=weights[0].dtype)
        experts.load_copies(linears, up)
        return experts

    @property
    def weights(self) -> list[nn.Parameter]:
        return [getattr(self, f"w{i}") for i in range(self.depth)]

    @property
    def biases(self) -> list[nn.Parameter | None]:
        return [getattr(self, f"b{i}") for i in range(self.depth)]

    def _layers(self) -> list[tuple[str, nn.Parameter, nn.Parameter | None]]:
        names = [str(i) for i in range(self.depth)] + (["_up"] if self.gated else [])
        return [(n, getattr(self, f"w{n}"), getattr(self, f"b{n}")) for n in names]

    def reset_parameters(self) -> None:
        # nn.Linear's default init, expert by expert.
        for _, w, b in self._layers():
            bound = w.shape[1] ** -0.5
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    def load_copies(self, linears: Sequence[Linear], up: Linear | None = None) -> None:
        """Copy a dense MLP's Linear layers into every expert (exactly)."""
        sources = [*linears, *([up] if up is not None else [])]
        targets = self._layers()
        if len(sources) != len(targets):
            raise ConfigError(f"cannot copy an MLP of {len(linears)} layers into experts of depth {self.depth}.")
        with torch.no_grad():
            for (name, w, b), (weight, bias) in zip(targets, sources):
                if (b is None) != (bias is None) or w.shape[1:] != weight.t().shape:
                    raise ConfigError(f"cannot copy a Linear of shape {tuple(weight.shape)} into expert layer {name}.")
                w.copy_(weight.t().unsqueeze(0).expand_as(w))
                if b is not None:
                    b.copy_(bias.unsqueeze(0).expand_as(b))

    def holds_copies(self, linears: Sequence[Linear], up: Linear | None = None) -> bool:
        """Whether every expert holds exactly these weights (a structure-only copy on the meta device holds no values)."""
        sources = [*linears, *([up] if up is not None else [])]
        if self.w0.is_meta:
            return len(sources) == len(self._layers())
        return len(sources) == len(self._layers()) and all(
            torch.equal(w, weight.t().unsqueeze(0).expand_as(w)) and (b is None or torch.equal(b, bias.unsqueeze(0).expand_as(b)))
            for (_, w, b), (weight, bias) in zip(self._layers(), sources)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _linear(x, self.w0, self.b0)
        h = self.act(h) * _linear(x, self.w_up, self.b_up) if self.gated else h
        for i in range(1, self.depth):
            h = _linear(h if self.gated and i == 1 else self.act(h), getattr(self, f"w{i}"), getattr(self, f"b{i}"))
        return h
