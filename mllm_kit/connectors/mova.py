"""MoVA's MoV-Adapter: instruction-gated fusion of expert encoders into a base encoder (TempleX98/MoVA @52f83e5,
``mova/model/multimodal_projector/builder.py`` ``MoVAdapter``; specs/components.md §5.3).

Member 0 is the base (MoVA: CLIP at high resolution, an R×R grid, ``[n_img, R², C]``); members 1…E are the experts,
each map ``[n_img, Nₑ, Cₑ]`` bilinearly resized (align_corners=False, as MoVA's ``feature_align``) to the base grid.

1. x ← base + pos-emb ``[1, R², C]`` (zeros); r ← base;
2. ``num_layers`` AdapterBlocks, each:
   * gate: MLP(D + C → C → E) on [t ‖ mean_tokens(x)] (last layer zero-initialised); softmax of
     logits − 1e6·(1 − coarse_mask), top-k kept and renormalised over the k;
   * x ← x + Σₑ wₑ·CrossAttn(LN x → LN fₑ): keys/values projected Cₑ → C, ``heads`` heads, 2-D rotary position
     embedding on queries and keys, a LayerNorm on the attention output (sub-LN), zero-initialised output projection;
   * x ← x + SelfAttn(LN x) (same attention, zero-initialised output); x ← x + SwiGLU(LN x) (hidden 8C/3, sub-LN,
     zero-initialised last layer);
3. x ← (x + r)/2; RegStage (SiLU, LayerNorm2d, linear out, zero-init last) → AdaptiveAvgPool2d(``output_side``) →
   RegStage; Linear(C → D) → GELU → Linear(D → D) → ``[n_img, output_side², D]``.

At initialisation every branch outputs exactly zero, so the adapter is the base path MLP(pool(base)).

Deviations from MoVA: the text context t is the masked mean of the instruction's LLM token embeddings (``text_context``,
the model's one instruction path; ``[n_img, D]``, so the gate reads D + C) instead of a BERT-large [CLS] vector (1024 +
C). MoVA's coarse routing (the LLM choosing the relevant experts in a first pass) is not implemented: ``coarse_mask``
is a fixed 0/1 per expert.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from timm.models.regnet import RegStage
from torch import nn

from mllm_kit.connectors.base import Connector, ConnectorOutput
from mllm_kit.encoders.base import VisualFeatures
from mllm_kit.encoders.mixture import resample_map
from mllm_kit.errors import ConfigError
from mllm_kit.layers.mlp import build_mlp
from mllm_kit.registry import register_connector


def rope_2d(grid: tuple[int, int], head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[rows·cols, head_dim]`` of MoVA's 2-D rotary embedding (EVA-02's ``VisionRotaryEmbeddingFast``): the
    first half of each head rotated by the row index, the second half by the column index, adjacent channel pairs."""
    rows, cols = grid
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64) / half)
    by_row = (torch.arange(rows, dtype=torch.float64)[:, None] * freqs).repeat_interleave(2, dim=-1)
    by_col = (torch.arange(cols, dtype=torch.float64)[:, None] * freqs).repeat_interleave(2, dim=-1)
    angles = torch.cat([by_row[:, None].expand(rows, cols, half), by_col[None].expand(rows, cols, half)], dim=-1)
    angles = angles.reshape(rows * cols, head_dim)
    return angles.cos().float(), angles.sin().float()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x₀, x₁, x₂, x₃, …) → (−x₁, x₀, −x₃, x₂, …)."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-b, a), dim=-1).flatten(-2)


class Attention(nn.Module):
    """MoVA's attention: LN(x) ``[n, R², C]`` queries over LN(kv) ``[n, R², C_kv]`` (``kv=None``: self-attention on LN(x)),
    no q/k/v biases, 2-D RoPE on q and k (both on the base grid), sub-LN, zero-initialised output → ``[n, R², C]``."""

    def __init__(self, dim: int, kv_dim: int, heads: int, grid: tuple[int, int], self_attention: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = None if self_attention else nn.LayerNorm(kv_dim)  # self-attention: one LN for q, k and v
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(kv_dim, dim, bias=False)
        self.v_proj = nn.Linear(kv_dim, dim, bias=False)
        self.inner_norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        cos, sin = rope_2d(grid, dim // heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        n, h = x.shape[0], self.heads
        x = self.norm_q(x)
        kv = x if self.norm_kv is None else self.norm_kv(kv)
        heads = lambda t: t.view(n, t.shape[1], h, -1).transpose(1, 2)  # noqa: E731
        cos, sin = self.rope_cos.to(x.dtype), self.rope_sin.to(x.dtype)
        rope = lambda t: t * cos + rotate_pairs(t) * sin  # noqa: E731
        q, k, v = rope(heads(self.q_proj(x))), rope(heads(self.k_proj(kv))), heads(self.v_proj(kv))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, x.shape[1], -1)
        return self.proj(self.inner_norm(out))


class SwiGLU(nn.Module):
    """LN → SiLU(W₁x)·W₂x → LN → W₃ (hidden 8C/3, W₃ zero-initialised); ``[n, N, C]`` → ``[n, N, C]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = int(dim * 8 / 3)
        self.norm, self.w1, self.w2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.ffn_norm, self.w3 = nn.LayerNorm(hidden), nn.Linear(hidden, dim)
        nn.init.zeros_(self.w3.weight)
        nn.init.zeros_(self.w3.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.w3(self.ffn_norm(F.silu(self.w1(x)) * self.w2(x)))


class AdapterBlock(nn.Module):
    """One MoV-Adapter block on x ``[n, R², C]``, expert maps ``[n, R², Cₑ]`` and text context ``[n, D]``."""

    def __init__(self, dim: int, expert_dims: Sequence[int], context_dim: int, heads: int, top_k: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Sequential(nn.Linear(context_dim + dim, dim), nn.GELU(), nn.Linear(dim, len(expert_dims)))
        nn.init.zeros_(self.gate[-1].weight)
        nn.init.zeros_(self.gate[-1].bias)
        self.cross_attn = nn.ModuleList(Attention(dim, c, heads, grid) for c in expert_dims)
        self.self_attn = Attention(dim, dim, heads, grid, self_attention=True)
        self.mlp = SwiGLU(dim)

    def route(self, x: torch.Tensor, context: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        """``[n, E]`` expert weights: softmax (fp32, masked experts at −1e6), top-k kept, renormalised over the k."""
        logits = self.gate(torch.cat([context.to(x.dtype), x.mean(dim=1)], dim=-1)).float() + mask_bias
        probs = logits.softmax(dim=-1)
        keep = torch.zeros_like(probs).scatter_(-1, probs.topk(self.top_k, dim=-1).indices, 1.0)
        weights = probs * keep
        return weights / weights.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor, experts: Sequence[torch.Tensor], context: torch.Tensor,
                mask_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.route(x, context, mask_bias)
        # Every expert runs, as in MoVA's training path: an unpicked one gets weight 0 (and a zero, not a missing, gradient).
        x = x + sum(w[:, e, None, None].to(x.dtype) * attn(x, f) for e, (attn, f) in enumerate(zip(self.cross_attn, experts)))
        x = x + self.self_attn(x)
        return x + self.mlp(x), w


@register_connector("mova")
class MoVAConnector(Connector):
    """MoV-Adapter: base ``[n_img, R², C]`` + E expert maps → ``[n_img, output_side², D]`` (specs/components.md §5.3).

    Options (defaults: MoVA's ``arch.py``): ``num_layers`` (num_projector_layers, 3), ``heads`` (16), ``top_k``
    (topk_experts, 3), ``output_side`` (null: half the base side, as MoVA's resolution//2 → 24 for a 48×48 base),
    ``regstage_depth`` (1), ``coarse_mask`` (one 0/1 per expert, null: all 1).

    The gate reads each image's instruction: ``forward(features, text_context=(embeds [n_img, L, D], mask [n_img, L]))``
    with the LLM token embeddings of the instruction (the model passes them, one row per image); the gate uses their
    masked mean. The output's ``metrics["mova_gate"]`` ``[E]``: the mean gate weight per expert (over images and
    blocks); its ``routing`` ``[num_layers, n_img, E]``: this forward's weights (both detached).
    """

    smoke_options = {"num_layers": 1, "heads": 2, "top_k": 1}
    reads_instruction = True

    def __init__(self, in_dims: Sequence[int], out_dim: int, grids: Sequence[tuple[int, int]], num_layers: int = 3,
                 heads: int = 16, top_k: int = 3, output_side: int | None = None, regstage_depth: int = 1,
                 coarse_mask: Sequence[int] | None = None) -> None:
        super().__init__(in_dims, out_dim)
        self.grids = [(int(g[0]), int(g[1])) for g in grids]
        if len(self.grids) != len(self.in_dims):
            raise ConfigError(f"mova: got {len(self.grids)} member grids for {len(self.in_dims)} members (in_dims).")
        num_experts = len(self.in_dims) - 1
        if num_experts < 1:
            raise ConfigError("mova: needs a base member (member 0) and at least one expert member; use an encoder mixture.")
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"mova: top_k={top_k} must be between 1 and the number of experts ({num_experts}: members 1…"
                              f"{num_experts}); set top_k ≤ {num_experts}.")
        if num_layers < 1 or regstage_depth < 1:
            raise ConfigError(f"mova: num_layers and regstage_depth must be ≥ 1, got {num_layers} and {regstage_depth}.")
        c, grid = self.in_dims[0], self.grids[0]
        if c % heads or (c // heads) % 4:
            raise ConfigError(f"mova: the base width {c} must split into heads={heads} heads of a multiple of 4 channels "
                              f"(2-D rotary embedding); pick heads so that {c} / heads is a multiple of 4.")
        mask = [1] * num_experts if coarse_mask is None else list(coarse_mask)
        if len(mask) != num_experts or any(v not in (0, 1) for v in mask) or not any(mask):
            raise ConfigError(f"mova: coarse_mask must give one 0/1 per expert ({num_experts} experts) with at least one 1, "
                              f"got {coarse_mask!r}.")
        self.register_buffer("mask_bias", -1e6 * (1.0 - torch.tensor(mask, dtype=torch.float32)), persistent=False)
        side = (grid[0] // 2, grid[1] // 2) if output_side is None else (int(output_side), int(output_side))
        if not 1 <= min(side) or side[0] > grid[0] or side[1] > grid[1]:
            raise ConfigError(f"mova: output_side {side[0]}×{side[1]} must be ≥ 1 and at most the base grid {grid[0]}×{grid[1]}; "
                              f"set output_side (null: half the base side).")
        self.output_grid = side
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], c))
        self.blocks = nn.ModuleList(AdapterBlock(c, self.in_dims[1:], out_dim, heads, top_k, grid) for _ in range(num_layers))
        stage = partial(RegStage, regstage_depth, c, c, stride=1, dilation=1, linear_out=True, act_layer=nn.SiLU,
                        norm_layer=LayerNorm2d)
        self.downsample = nn.Sequential(stage(), nn.AdaptiveAvgPool2d(side), stage())
        for block in (*self.downsample[0].children(), *self.downsample[2].children()):
            block.zero_init_last()  # with linear_out each block starts as the identity
        self.readout = build_mlp(c, out_dim, 2, "gelu")

    def num_tokens(self, input_tokens: int, grid: tuple[int, int]) -> int:
        return self.output_grid[0] * self.output_grid[1]

    def instruction(self, text_context: tuple[torch.Tensor, torch.Tensor] | None, n: int) -> torch.Tensor:
        """``(embeds [n_img, L, D], mask [n_img, L])`` → their masked mean ``[n_img, D]``, what the gate reads."""
        if text_context is None:
            raise ConfigError("mova: its gate reads each image's instruction; pass text_context=(embeds [n_img, L, D], "
                              "mask [n_img, L]) (MLLM.forward does).")
        embeds, mask = text_context
        if embeds.dim() != 3 or embeds.shape[-1] != self.out_dim or mask.shape != embeds.shape[:2]:
            raise ConfigError(f"mova: text_context takes embeds [n_img, L, {self.out_dim}] and mask [n_img, L], got "
                              f"{list(embeds.shape)} and {list(mask.shape)}.")
        if embeds.shape[0] != n:
            raise ConfigError(f"mova: its gate reads one instruction row per image; got {embeds.shape[0]} context rows for "
                              f"{n} images.")
        m = mask.to(embeds.dtype).unsqueeze(-1)
        return (embeds * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)

    def forward(self, features: Sequence[VisualFeatures], text_context: tuple[torch.Tensor, torch.Tensor] | None = None) -> ConnectorOutput:
        if len(features) != len(self.in_dims):
            raise ConfigError(f"mova was built for {len(self.in_dims)} members but got {len(features)} feature sets.")
        maps = []
        for i, f in enumerate(features):
            x = f.selected
            if x.shape[1] != f.grid[0] * f.grid[1] or (i == 0 and tuple(f.grid) != self.grids[0]):
                raise ConfigError(f"mova: member {i} gives {x.shape[1]} tokens on a {f.grid[0]}×{f.grid[1]} grid (built for "
                                  f"{self.grids[i][0]}×{self.grids[i][1]}); a CLS token? set its select_feature: patch.")
            maps.append(x)
        base, grid = maps[0], self.grids[0]
        n = base.shape[0]
        context = self.instruction(text_context, n)
        experts = [resample_map(x, f.grid, grid, align_corners=False) for x, f in zip(maps[1:], features[1:])]  # feature_align
        x, weights = base + self.pos_embed.to(base.dtype), []
        for block in self.blocks:
            x, w = block(x, experts, context, self.mask_bias)
            weights.append(w.detach())
        x = (x + base) / 2
        x = self.downsample(x.transpose(1, 2).reshape(n, -1, *grid))
        routing = torch.stack(weights)
        return ConnectorOutput(tokens=self.readout(x.flatten(2).transpose(1, 2)), metrics={"mova_gate": routing.mean(dim=(0, 1))},
                               routing=routing)
