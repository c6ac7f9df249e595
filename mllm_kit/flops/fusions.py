"""Formulas of the fusions of an encoder mixture (one :class:`~mllm_kit.flops.connectors.Features` per member).

* ``channel_concat``: the inner connector on the fused map (``fused_grid`` tokens, Σ Cᵢ channels); resampling costs no
  products. ``sequence_concat``: each member's own projector on its tokens.
* ``comm``: per member and chosen layer an LLN (Linear Cₘ→Cₘ) on the member's tokens, every other member's merge
  through its MLP into the first member's width, then the inner connector on the first member's grid.
* ``mova``: per adapter block the gate MLP (one row per image), every expert's cross-attention (all experts run, as
  in MoVA's training path; keys/values from the expert map resampled to the base grid), self-attention and the SwiGLU
  FFN on the R² base tokens; then the two RegNet stages around the pooling and the readout MLP.
* ``sva``: the member adapters on their tokens; per group and layer the context projection (one row per image), the
  query input projection, q/o projections and the output MLP on the s² queries, keys/values on every member token,
  attention of each query over its own window (Σ rᵢ keys); the readout MLP; and each ``llm_layers`` re-aggregation —
  the same layer with the LLM's hidden states at the s² image positions as queries — tallied once the LLM's flags
  are known.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mllm_kit.connectors.channel_concat import ChannelConcat
from mllm_kit.connectors.comm import COMMConnector
from mllm_kit.connectors.mova import MoVAConnector
from mllm_kit.connectors.sequence_concat import SequenceConcat
from mllm_kit.connectors.sva import SVAConnector
from mllm_kit.flops.connectors import Context, Features, Visual, connector_flops, register_connector_flops, regstage, selected
from mllm_kit.flops.tally import IMAGE, Tally, attention, fan_in, linear, sequential


def fused(grid: tuple[int, int], width: int, grad: bool) -> Features:
    return Features(tokens=grid[0] * grid[1], width=width, grid=tuple(grid), grads=(grad,), selected=0)


@register_connector_flops(ChannelConcat)
def channel_concat_flops(conn: ChannelConcat, x, t: Tally, ctx: Context) -> Visual:
    inner = connector_flops(conn.inner, [fused(conn.fused_grid, conn.fused_dim, any(f.grad() for f in x))], t, ctx)
    return Visual(inner.grad, selected(x))


@register_connector_flops(SequenceConcat)
def sequence_concat_flops(conn: SequenceConcat, x, t: Tally, ctx: Context) -> Visual:
    outs = [connector_flops(p, [f], t, ctx) for p, f in zip(conn.projectors, x)]
    return Visual(any(v.grad for v in outs) or t.trains_param(conn.separator), [v.reads[0] for v in outs])


@register_connector_flops(COMMConnector)
def comm_flops(conn: COMMConnector, x, t: Tally, ctx: Context) -> Visual:
    merged = []
    for k, (f, merge) in enumerate(zip(x, conn.merges)):
        grad = t.trains_param(merge.weights)
        for layer, lln in zip(merge.layers, merge.proj):
            grad = sequential(t, lln, f.tokens, IMAGE, f.grad(layer)) or grad
        if k:
            grad = sequential(t, conn.align[k - 1], f.tokens, IMAGE, grad)
        merged.append(grad)
    inner = connector_flops(conn.inner, [fused(conn.fused_grid, conn.fused_dim, any(merged))], t, ctx)
    return Visual(inner.grad, [max(m.layers) for m in conn.merges])


def _mova_attention(t: Tally, attn: nn.Module, rows: int, grad_q: bool, grad_kv: bool) -> bool:
    """MoVA's attention on ``rows`` base tokens: q from LN(x), k/v from LN(kv) (self-attention: LN(x)), the output
    projection after the inner LayerNorm; returns the branch output's flag."""
    q_in = grad_q or t.trains(attn.norm_q)
    kv_in = q_in if attn.norm_kv is None else grad_kv or t.trains(attn.norm_kv)
    q = linear(t, attn.q_proj, rows, IMAGE, q_in)
    k = linear(t, attn.k_proj, rows, IMAGE, kv_in)
    v = linear(t, attn.v_proj, rows, IMAGE, kv_in)
    attention(t, rows * rows, attn.q_proj.out_features, IMAGE, q or k or v)
    return linear(t, attn.proj, rows, IMAGE, q or k or v or t.trains(attn.inner_norm))


@register_connector_flops(MoVAConnector)
def mova_flops(conn: MoVAConnector, x, t: Tally, ctx: Context) -> Visual:
    base, rows = x[0], x[0].tokens
    grad = base.grad() or t.trains_param(conn.pos_embed)
    experts = [f.grad() for f in x[1:]]
    for block in conn.blocks:
        gate = sequential(t, block.gate, 1, IMAGE, grad or ctx.text_grad)  # [context ‖ mean(x)]: one row per image
        branches = [_mova_attention(t, attn, rows, grad, e) for attn, e in zip(block.cross_attn, experts)]
        grad = grad or gate or any(branches)
        grad = _mova_attention(t, block.self_attn, rows, grad, grad) or grad
        mlp = block.mlp
        grad = fan_in(t, [mlp.w1, mlp.w2, mlp.w3], rows, IMAGE, grad or t.trains(mlp.norm)) or grad or t.trains(mlp.ffn_norm)
    stage_in, _, stage_out = conn.downsample
    grad = regstage(t, stage_in, conn.grids[0], grad or base.grad())
    grad = regstage(t, stage_out, conn.output_grid, grad)
    out = conn.output_grid[0] * conn.output_grid[1]
    return Visual(sequential(t, conn.readout, out, IMAGE, grad), selected(x))


def _sva_layer(t: Tally, layer: nn.Module, queries: int, tokens: Sequence[int], kv_grads: Sequence[bool],
               context_grad: bool, grad_q: bool) -> bool:
    """One ``VisionCrossAttentionLayer`` per image: ``queries`` = s² one-token queries, ``tokens[i]`` = member i's tokens
    (its s² windows together)."""
    ctx = linear(t, layer.proj_context, 1, IMAGE, context_grad)
    q_in = linear(t, layer.proj_in, queries, IMAGE, grad_q or ctx)
    q = sequential(t, layer.q_proj, queries, IMAGE, q_in)
    kv = False
    for i, (k_proj, v_proj, n, g) in enumerate(zip(layer.k_proj, layer.v_proj, tokens, kv_grads)):
        g = g or t.trains_param(layer.pos_embed.get(str(i)))
        kv = sequential(t, k_proj, n, IMAGE, g) or kv
        kv = sequential(t, v_proj, n, IMAGE, g) or kv
    attention(t, sum(tokens), layer.o_proj.in_features, IMAGE, q or kv)  # each query over its window: Σᵢ rᵢ·s² = Σᵢ Nᵢ
    out = linear(t, layer.o_proj, queries, IMAGE, q or kv)
    grad = sequential(t, layer.proj_out, queries, IMAGE, q_in or out or t.trains(layer.norm))
    return grad or grad_q


@register_connector_flops(SVAConnector)
def sva_flops(conn: SVAConnector, x, t: Tally, ctx: Context) -> Visual:
    s2 = conn.query_side ** 2
    tokens = [f.tokens for f in x]
    adapted = [sequential(t, adapter, f.tokens, IMAGE, f.grad()) for f, adapter in zip(x, conn.adapters)]
    groups = []
    for layers in conn.samplers:
        grad = t.trains_param(conn.queries)
        for layer in layers:
            grad = _sva_layer(t, layer, s2, tokens, adapted, adapted[0], grad)
        groups.append(grad)
    grad = sequential(t, conn.readout, s2, IMAGE, any(groups)) or t.trains_param(conn.image_newline)
    rewrites = {v: t.trains(conn.reaggregators[str(v)]) or any(adapted) for v in conn.llm_layers}

    def rewrite_flops(layer_grads: dict[int, bool], into: Tally) -> None:
        for v in conn.llm_layers:
            _sva_layer(into, conn.reaggregators[str(v)], s2, tokens, adapted, adapted[0], layer_grads.get(v, False))

    return Visual(grad, selected(x), rewrites=rewrites, rewrite_flops=rewrite_flops if conn.llm_layers else None)
