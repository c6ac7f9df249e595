"""Sparse MoE FFNs upcycled from a dense LLM (MoE-LLaVA, specs/components.md §6.1).

``upcycle_moe`` replaces the FFN (``mlp``) of chosen decoder layers with :class:`SparseMoE`: E experts that
are exact copies of that FFN (stored stacked, ``[E, in, out]``) and a fresh router Linear(D→E, no bias).
Routing and dispatch are :mod:`mllm_kit.layers.routing`'s — DeepSpeed's top-k gating with capacity
⌈k·T/E·cf⌉ per expert (``capacity_factor`` in training, ``eval_capacity_factor`` otherwise), overflow
dropped in routing order, renormalised gates, optional Gumbel noise on the second choice. Identical experts
with renormalised gates compute the dense FFN, so right after the transform the model's logits are
unchanged (when nothing is dropped: ``eval_capacity_factor`` 2 with top-2 of 4 never drops).

Supported FFNs: gated ``gate_proj``/``up_proj``/``down_proj`` (Llama, Qwen2, Mistral, StableLM), fused
``gate_up_proj``/``down_proj`` (Phi-3), and plain ``fc1``/``fc2`` (Phi-2).

Each layer reports ``llm_moe_balance`` (E·Σ f_e·P_e; MoE-LLaVA weights the sum over layers by 0.01) and,
with ``z_loss: true``, ``llm_moe_z`` through the aux-loss channel, and its per-expert token fractions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mllm_kit.errors import ConfigError
from mllm_kit.layers.experts import ExpertMLP, Linear
from mllm_kit.layers.routing import balance_loss, dispatch, expert_load, route, z_loss
from mllm_kit.registry import register_transform


def _ffn_linears(ffn: nn.Module) -> tuple[list[Linear], Linear | None, nn.Module]:
    """A transformers FFN module as ``(linears, up, act)``: its projections in order as ``(weight [out, in], bias)``, the
    up projection of a gated FFN (``None`` for a plain one) and its activation."""
    def lin(m: nn.Linear) -> Linear:
        return m.weight, m.bias

    if all(hasattr(ffn, a) for a in ("gate_proj", "up_proj", "down_proj")):
        return [lin(ffn.gate_proj), lin(ffn.down_proj)], lin(ffn.up_proj), ffn.act_fn
    if hasattr(ffn, "gate_up_proj") and hasattr(ffn, "down_proj"):  # Phi-3 fuses them: gate first, then up
        bias = ffn.gate_up_proj.bias
        (w_gate, w_up), (b_gate, b_up) = ffn.gate_up_proj.weight.chunk(2), bias.chunk(2) if bias is not None else (None, None)
        return [(w_gate, b_gate), lin(ffn.down_proj)], (w_up, b_up), ffn.activation_fn
    if hasattr(ffn, "fc1") and hasattr(ffn, "fc2"):
        return [lin(ffn.fc1), lin(ffn.fc2)], None, ffn.activation_fn
    raise ConfigError(f"upcycle_moe: the FFN {type(ffn).__name__} has none of gate_proj/up_proj/down_proj, gate_up_proj/down_proj "
                      "or fc1/fc2; it cannot be upcycled.")


class SparseMoE(nn.Module):
    """Drop-in replacement for a decoder layer's FFN: ``[B, S, D] → [B, S, D]``. Its balance (and z-) loss and routing
    statistics go to ``report``, which :class:`~mllm_kit.MLLM` binds for each forward (summed over layers)."""

    reports_aux = True

    def __init__(self, ffn: nn.Module, num_experts: int = 4, top_k: int = 2, capacity_factor: float = 1.5,
                 eval_capacity_factor: float = 2.0, min_capacity: int = 0, noisy_gate: bool = True, z_loss: bool = False,
                 static_capacity: bool = False) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"upcycle_moe needs 1 ≤ top_k ≤ num_experts, got top_k={top_k}, num_experts={num_experts}.")
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.eval_capacity_factor, self.min_capacity = capacity_factor, eval_capacity_factor, min_capacity
        self.noisy_gate, self.use_z_loss, self.static_capacity = noisy_gate, z_loss, static_capacity
        linears, up, act = _ffn_linears(ffn)
        self.experts = ExpertMLP.copies(linears, num_experts, act, up)
        width = linears[-1][0].shape[0]
        self.router = nn.Linear(width, num_experts, bias=False)

    def capacity(self, num_tokens: int) -> int:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return max(self.min_capacity, math.ceil(num_tokens / self.num_experts * self.top_k * factor))

    def forward(self, hidden: torch.Tensor, report: Callable | None = None) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        # The router runs in fp32, as DeepSpeed's gate does.
        logits = nn.functional.linear(x.float(), self.router.weight.float())
        routing = route(logits, self.top_k, self.capacity(x.shape[0]), noisy=self.noisy_gate and self.training and self.top_k > 1,
                        static=self.static_capacity)
        out = dispatch(x, routing, self.num_experts, self.experts)
        # Computed whether or not a report is bound: a checkpointed layer recomputed in backward must save the same tensors.
        top1 = routing.experts[:, 0]
        aux = {"llm_moe_balance": balance_loss(routing.probs, top1, self.num_experts)}
        if self.use_z_loss:
            aux["llm_moe_z"] = z_loss(routing.logits)
        if report is not None:
            report(aux, {"moe_load": expert_load(top1, self.num_experts).detach(),
                         "moe_dropped": (~routing.kept).float().mean().detach()})
        return out.view_as(hidden)


def moe_layer_indices(layers: str | Sequence[int], depth: int) -> list[int]:
    """``every_other`` (0, 2, 4, …: MoE-LLaVA's ``sparse``), ``first_half``, ``second_half``, ``all``, or indices."""
    named = {
        "every_other": list(range(0, depth, 2)),
        "first_half": list(range(depth // 2)),
        "second_half": list(range(depth // 2, depth)),
        "all": list(range(depth)),
    }
    if isinstance(layers, str):
        if layers not in named:
            raise ConfigError(f"upcycle_moe layers {layers!r} is not one of {sorted(named)} or a list of layer indices.")
        return named[layers]
    indices = sorted({int(i) for i in layers})
    if not indices or indices[0] < 0 or indices[-1] >= depth:
        raise ConfigError(f"upcycle_moe layers {list(layers)} must be indices in 0..{depth - 1}.")
    return indices


@register_transform("upcycle_moe")
class UpcycleMoE:
    """Replace the FFN of the chosen decoder layers with a :class:`SparseMoE` of exact copies (MoE-LLaVA stage III)."""

    def __init__(self, layers: str | list[int] = "every_other", num_experts: int = 4, top_k: int = 2, capacity_factor: float = 1.5,
                 eval_capacity_factor: float = 2.0, min_capacity: int = 0, noisy_gate: bool = True, z_loss: bool = False,
                 static_capacity: bool = False) -> None:
        self.layers = layers
        self.options: dict[str, Any] = dict(num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
                                            eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity,
                                            noisy_gate=noisy_gate, z_loss=z_loss, static_capacity=static_capacity)

    def __call__(self, model) -> None:
        decoder = model.llm.decoder_layers
        for index in moe_layer_indices(self.layers, len(decoder)):
            layer = decoder[index]
            ffn = getattr(layer, "mlp", None)
            if ffn is None:
                raise ConfigError(f"upcycle_moe: decoder layer {index} ({type(layer).__name__}) has no 'mlp' FFN.")
            if isinstance(ffn, SparseMoE):
                raise ConfigError(f"upcycle_moe: decoder layer {index} is already a mixture of experts.")
            linears, up, _ = _ffn_linears(ffn)
            moe = SparseMoE(ffn, **self.options).to(device=linears[0][0].device, dtype=linears[0][0].dtype).train(ffn.training)
            if not moe.experts.holds_copies(linears, up):  # MoE-LLaVA asserts this too
                raise ConfigError(f"upcycle_moe: the experts of layer {index} are not exact copies of its FFN.")
            layer.mlp = moe
        model.record_transform({"name": "upcycle_moe", "layers": self.layers, **self.options})
