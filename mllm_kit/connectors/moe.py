"""CuMo's MLP-MoE connector and the ``upcycle`` transform (specs/components.md §6.5).

E experts, each an ``mlp{depth}x_gelu`` (C→D→D); a router Linear(C→E, no bias); per-token softmax, top-k,
weights renormalised to sum to 1; output Σ_k w_k · Expert_k(x). Auxiliary losses (reported through
``aux_losses``, weighted by the recipe's ``aux_loss_coef``; CuMo uses 0.1 and 0.01):

* ``moe_balance``: E · Σ_e f_e · P_e, f_e = fraction of tokens whose top-1 expert is e, P_e = mean router prob;
* ``moe_z``: mean over tokens of logsumexp(router logits)².

Experts are stored as stacked weights ``[E, in, out]``; routing and dispatch are :mod:`mllm_kit.layers.routing`'s
(one scatter, a batched matmul per layer over all experts, one gather — no Python loop over tokens or experts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mllm_kit.connectors.base import Connector, ConnectorOutput
from mllm_kit.connectors.mlp import MLPConnector
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.registry import register_connector, register_transform
from mllm_kit.layers.experts import ExpertMLP
from mllm_kit.layers.mlp import activation, single_width
from mllm_kit.layers.routing import balance_loss, dispatch, route, z_loss


@register_connector("moe_mlp")
class MoEMLPConnector(Connector):
    """Sparse mixture of MLP connectors routed per token (CuMo, specs/components.md §6.5).

    ``[n_img, N, C]`` → ``[n_img, N, D]``; ``num_experts`` (4) experts, ``top_k`` (2) per token. ``static_capacity``:
    dispatch buffers sized from shapes, without a host sync (:mod:`mllm_kit.layers.routing`; same outputs).
    """

    def __init__(self, in_dims: Sequence[int], out_dim: int, num_experts: int = 4, top_k: int = 2, depth: int = 2, act: str = "gelu",
                 static_capacity: bool = False) -> None:
        super().__init__(in_dims, out_dim)
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"moe_mlp needs 1 ≤ top_k ≤ num_experts, got top_k={top_k}, num_experts={num_experts}.")
        if depth < 1:
            raise ConfigError(f"moe_mlp depth must be ≥ 1, got {depth}.")
        width = single_width(self.in_dims, "moe_mlp")
        self.num_experts, self.top_k, self.depth, self.act = num_experts, top_k, depth, act
        self.static_capacity = static_capacity
        self.router = nn.Linear(width, num_experts, bias=False)
        self.experts = ExpertMLP(num_experts, [width] + [out_dim] * depth, activation(act, "moe_mlp"))

    def forward(self, features: Sequence[VisualFeatures], text_context: torch.Tensor | None = None) -> ConnectorOutput:
        x = features[0].selected
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # [T, C]
        routing = route(self.router(tokens), self.top_k, static=self.static_capacity)  # fp32 routing, no drops
        out = dispatch(tokens, routing, self.num_experts, self.experts)
        aux = {"moe_balance": balance_loss(routing.probs, routing.experts[:, 0], self.num_experts), "moe_z": z_loss(routing.logits)}
        return ConnectorOutput(tokens=out.reshape(*shape[:-1], self.out_dim), aux_losses=aux)


@register_transform("upcycle")
class UpcycleConnector:
    """Replace a trained ``mlp`` connector by a ``moe_mlp`` whose experts are exact copies of it and whose
    router is freshly initialised (CuMo's co-upcycling, specs/components.md §6.5). Right after the
    transform the connector's output equals the dense MLP's: identical experts, gates that sum to 1."""

    def __init__(self, num_experts: int = 4, top_k: int = 2, static_capacity: bool = False) -> None:
        self.num_experts, self.top_k, self.static_capacity = num_experts, top_k, static_capacity

    def __call__(self, model) -> None:
        dense = model.connector
        if not isinstance(dense, MLPConnector):
            raise ConfigError(f"upcycle needs an 'mlp' connector, found {type(dense).__name__}.")
        linears = [m for m in dense.mlp if isinstance(m, nn.Linear)]
        spec = {"name": "moe_mlp", "num_experts": self.num_experts, "top_k": self.top_k, "depth": len(linears), "act": dense.act,
                "static_capacity": self.static_capacity}
        moe = MoEMLPConnector(dense.in_dims, dense.out_dim, num_experts=self.num_experts, top_k=self.top_k, depth=len(linears),
                              act=dense.act, static_capacity=self.static_capacity)
        moe.to(device=linears[0].weight.device, dtype=linears[0].weight.dtype)
        moe.experts.load_copies([(m.weight, m.bias) for m in linears])
        moe.build_spec = spec
        model.connector = moe
