"""Cambrian-1's Spatial Vision Aggregator (cambrian-mllm/cambrian @539ffc3, ``vision_sampler.py``, ``cambrian_arch.py``;
specs/components.md §5.4).

Member i gives ``[n_img, Nᵢ, Cᵢ]`` on a ``rowsᵢ × colsᵢ`` grid; each side must be a multiple of the query side s.

1. per-member adapter Linear(Cᵢ→hidden) → GELU → Linear(hidden→hidden) → LayerNorm;
2. the global context is the mean over tokens of member 0's adapted map, ``[n_img, hidden]``;
3. member i's map is cut into s² windows, ``[n_img·s², rᵢ, hidden]`` with rᵢ = (rowsᵢ/s)(colsᵢ/s): the query at
   cell (u, v) sees only the tokens under that cell (1 token for a 24×24 tower, 16 for the 96×96 ConvNeXt at s = 24);
4. one learnable query per group (``vision_query``, std 1/√hidden) on every cell goes through ``num_layers`` layers:
   q' = Linear([q ‖ Linear(ctx)]); q' ← q' + Attn(q' → windows of all members, keys/values projected per member, LN
   before every q/k/v projection, no biases, a learned position embedding per member window of > 1 token);
   q' ← LN(q'); q ← MLP(q') + q;
5. the groups' queries are concatenated over channels: Linear(hidden·G → D) → GELU → Linear(D → D) → ``[n_img, s², D]``
   (``newline``: Cambrian's ``image_newline`` [D] after every row → ``[n_img, s(s+1), D]``).

``llm_layers``: Cambrian also re-aggregates inside the LLM: after each listed decoder layer the LLM's hidden states
at the image positions are the queries (q_dim = D) of one more such layer over the same windows and context, and its
output replaces them (``cambrian_llama.py``; Cambrian-8B: layers 0, 3, …, 27). Those layers live in ``reaggregators``
(keyed by ``str(layer)``); :meth:`forward` returns one rewrite per layer (``ConnectorOutput.rewrites``) holding this
forward's windows and context, and the model runs them from hooks on the decoder layers (:mod:`mllm_kit.llm.inject`).

Parameters and their Cambrian names: ``adapters.<i>`` = ``mm_projector_aux_<i>``, ``queries`` = ``vision_query``,
``samplers.<g>`` = ``vision_sampler_<g>``, ``reaggregators.<layer>`` = ``vision_sampler_layers``, ``readout`` =
``mm_projector``, ``image_newline``. Cambrian's optimiser gives ``mm_vision_sampler_lr`` to every name holding
``vision_sampler`` or ``vision_query`` (``cambrian_trainer.py``, ``create_optimizer``): in a recipe, ``module_lr`` for
``connector.samplers``, ``connector.reaggregators`` and ``connector.queries`` (``recipes/cambrian.yaml``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mllm_kit.connectors.base import Connector, ConnectorOutput
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.errors import ConfigError
from mllm_kit.layers.mlp import build_mlp
from mllm_kit.llm.steps import Rewrite
from mllm_kit.registry import register_connector


def windows(x: torch.Tensor, grid: tuple[int, int], side: int) -> torch.Tensor:
    """``[n, rows·cols, C]`` (row-major) → ``[n·side², (rows/side)·(cols/side), C]``: the tokens under each cell of a
    ``side × side`` grid, cells row-major, each window's tokens row-major."""
    n, _, c = x.shape
    a, b = grid[0] // side, grid[1] // side  # window rows, cols
    x = x.reshape(n, side, a, side, b, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n * side * side, a * b, c)


class VisionCrossAttentionLayer(nn.Module):
    """One SVA layer: queries ``[m, 1, q_dim]`` (m = n_img·s²), context ``[n_img, context_dim]``, member windows
    ``[m, rᵢ, hidden]`` → ``[m, 1, q_dim]`` (specs/components.md §5.4, "VisionCrossAttentionLayer")."""

    def __init__(self, q_dim: int, context_dim: int, hidden: int, heads: int, window_sizes: Sequence[int]) -> None:
        super().__init__()
        self.heads = heads
        self.proj_context = nn.Linear(context_dim, hidden, bias=False)
        self.proj_in = nn.Linear(q_dim + hidden, hidden, bias=False)
        self.q_proj = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden, bias=False))
        self.k_proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden, bias=False)) for _ in window_sizes)
        self.v_proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden, bias=False)) for _ in window_sizes)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        # Cambrian gives a one-token window no position embedding (it would only shift that member's LN input).
        self.pos_embed = nn.ParameterDict({str(i): nn.Parameter(torch.randn(r, hidden)) for i, r in enumerate(window_sizes) if r > 1})
        self.norm = nn.LayerNorm(hidden)
        self.proj_out = nn.Sequential(nn.Linear(hidden, hidden, bias=False), nn.GELU(), nn.Linear(hidden, q_dim, bias=False))

    def attend(self, q: torch.Tensor, kv: Sequence[torch.Tensor]) -> torch.Tensor:
        m, h = q.shape[0], self.heads
        kv = [x + self.pos_embed[str(i)].to(x.dtype) if str(i) in self.pos_embed else x for i, x in enumerate(kv)]
        k = torch.cat([proj(x) for proj, x in zip(self.k_proj, kv)], dim=1)
        v = torch.cat([proj(x) for proj, x in zip(self.v_proj, kv)], dim=1)
        heads = lambda t: t.view(m, t.shape[1], h, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(heads(self.q_proj(q)), heads(k), heads(v))  # over one cell's window
        return self.o_proj(out.transpose(1, 2).reshape(m, q.shape[1], -1))

    def forward(self, q: torch.Tensor, context: torch.Tensor, kv: Sequence[torch.Tensor]) -> torch.Tensor:
        residual = q
        context = self.proj_context(context).repeat_interleave(q.shape[0] // context.shape[0], dim=0).unsqueeze(1)
        q = self.proj_in(torch.cat([q, context], dim=-1))
        q = self.norm(q + self.attend(q, kv))
        return self.proj_out(q) + residual


@register_connector("sva")
class SVAConnector(Connector):
    """Spatial Vision Aggregator over an encoder mixture: ``[n_img, Nᵢ, Cᵢ]`` per member → ``[n_img, s², D]``
    (specs/components.md §5.4). Options (defaults: Cambrian-8B): ``query_side`` s (24), ``hidden`` (1024),
    ``num_layers`` (connector_depth, 3), ``heads`` (16), ``num_query_groups`` (1), ``newline`` (false),
    ``llm_layers`` (none; Cambrian-8B: 0, 3, …, 27)."""

    smoke_options: ClassVar[dict[str, Any]] = {"query_side": 2, "hidden": 32, "num_layers": 1, "heads": 2,
                     "llm_layers": lambda layers: [0] if layers else layers}

    def __init__(self, in_dims: Sequence[int], out_dim: int, grids: Sequence[tuple[int, int]], query_side: int = 24,
                 hidden: int = 1024, num_layers: int = 3, heads: int = 16, num_query_groups: int = 1, newline: bool = False,
                 llm_layers: Sequence[int] | None = None, members: Sequence[str] | None = None) -> None:
        super().__init__(in_dims, out_dim)
        self.members = list(members) if members is not None else [str(i) for i in range(len(self.in_dims))]
        self.grids = [(int(g[0]), int(g[1])) for g in grids]
        s = self.query_side = int(query_side)
        if len(self.grids) != len(self.in_dims):
            raise ConfigError(f"sva: got {len(self.grids)} member grids for {len(self.in_dims)} members (in_dims).")
        if s < 1 or num_layers < 1 or num_query_groups < 1:
            raise ConfigError(f"sva: query_side, num_layers and num_query_groups must be ≥ 1, got {query_side}, {num_layers}, "
                              f"{num_query_groups}.")
        if hidden % heads:
            raise ConfigError(f"sva: hidden={hidden} is not divisible by heads={heads}; pick heads that divide hidden.")
        for i, (rows, cols) in enumerate(self.grids):
            if rows % s or cols % s:
                name = self.members[i]
                raise ConfigError(f"sva: member {name} has a {rows}×{cols} patch grid, which does not tile into the {s}×{s} query "
                                  f"grid (query_side={s}); each side of every member grid must be a multiple of query_side — "
                                  f"change query_side or resample the member (model.encoder.resample.{name}).")
        self.llm_layers = sorted({int(v) for v in llm_layers}) if llm_layers else []
        if self.llm_layers and newline:
            raise ConfigError("sva: llm_layers (re-aggregation inside the LLM) with newline: true is not supported; "
                              "set newline: false or llm_layers: null.")
        if any(v < 0 for v in self.llm_layers):
            raise ConfigError(f"sva: llm_layers must be LLM layer indices ≥ 0, got {list(llm_layers)}.")
        self.window_sizes = [(rows // s) * (cols // s) for rows, cols in self.grids]
        self.adapters = nn.ModuleList(nn.Sequential(*build_mlp(c, hidden, 2, "gelu"), nn.LayerNorm(hidden)) for c in self.in_dims)
        self.queries = nn.Parameter(torch.randn(num_query_groups, hidden) / math.sqrt(hidden))
        self.samplers = nn.ModuleList(
            nn.ModuleList(VisionCrossAttentionLayer(hidden, hidden, hidden, heads, self.window_sizes) for _ in range(num_layers))
            for _ in range(num_query_groups)
        )
        self.readout = build_mlp(hidden * num_query_groups, out_dim, 2, "gelu")
        self.image_newline = nn.Parameter(torch.randn(out_dim) / math.sqrt(out_dim)) if newline else None
        self.reaggregators = nn.ModuleDict(
            {str(v): VisionCrossAttentionLayer(out_dim, hidden, hidden, heads, self.window_sizes) for v in self.llm_layers}
        )

    def layers_written(self) -> list[int]:
        return [v + 1 for v in self.llm_layers]

    def num_tokens(self, input_tokens: int, grid: tuple[int, int]) -> int:
        s = self.query_side
        return s * (s + int(self.image_newline is not None))

    def forward(self, features: Sequence[VisualFeatures], text_context: torch.Tensor | None = None) -> ConnectorOutput:
        if len(features) != len(self.adapters):
            raise ConfigError(f"sva was built for {len(self.adapters)} members but got {len(features)} feature sets.")
        s = self.query_side
        adapted, kv = [], []
        for i, (f, adapter, grid) in enumerate(zip(features, self.adapters, self.grids)):
            x = f.selected
            if tuple(f.grid) != grid or x.shape[1] != grid[0] * grid[1]:
                raise ConfigError(f"sva: member {i} was built for a {grid[0]}×{grid[1]} grid ({grid[0] * grid[1]} patch tokens) "
                                  f"but gives {x.shape[1]} tokens on a {f.grid[0]}×{f.grid[1]} grid (a CLS token?); set its "
                                  f"select_feature: patch.")
            adapted.append(adapter(x))
            kv.append(windows(adapted[-1], grid, s))
        n = adapted[0].shape[0]
        context = adapted[0].mean(dim=1)
        groups = []
        for query, layers in zip(self.queries, self.samplers):
            q = query.to(context.dtype).expand(n * s * s, 1, -1)
            for layer in layers:
                q = layer(q, context, kv)
            groups.append(q.view(n, s * s, -1))
        tokens = self.readout(torch.cat(groups, dim=-1))
        if self.image_newline is not None:
            newline = self.image_newline.to(tokens.dtype).expand(n, s, 1, -1)
            tokens = torch.cat([tokens.view(n, s, s, -1), newline], dim=2).reshape(n, s * (s + 1), -1)
        rewrites = tuple(Rewrite(v, partial(self.reaggregate, v, windows=kv, context=context)) for v in self.llm_layers)
        return ConnectorOutput(tokens=tokens, steps=rewrites)

    def reaggregate(self, layer: int, hidden: torch.Tensor, windows: Sequence[torch.Tensor], context: torch.Tensor) -> torch.Tensor:
        """Cambrian's re-aggregation after LLM layer ``layer`` (one of ``llm_layers``): the LLM hidden states at the
        image positions, ``[n_img·s², D]``, re-attend to ``windows`` (per member ``[n_img·s², rᵢ, hidden]``) with the
        global ``context`` ``[n_img, hidden]`` → ``[n_img·s², D]`` (residual included)."""
        if str(layer) not in self.reaggregators:
            raise ConfigError(f"sva: no re-aggregation layer for LLM layer {layer}; llm_layers is {self.llm_layers}.")
        s, n = self.query_side, context.shape[0]
        if hidden.shape != (n * s * s, self.out_dim):
            raise ConfigError(f"sva: re-aggregation expects the hidden states at the image positions, [{n * s * s}, "
                              f"{self.out_dim}] ({n} images × {s * s} tokens), got {list(hidden.shape)}.")
        block = self.reaggregators[str(layer)]
        dtype = block.proj_in.weight.dtype  # the LLM may run in another dtype than the connector
        out = block(hidden.unsqueeze(1).to(dtype), context.to(dtype), [w.to(dtype) for w in windows])
        return out.view(n * s * s, -1).to(hidden.dtype)
