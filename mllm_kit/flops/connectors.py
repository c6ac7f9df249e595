"""Connector formulas, one per family, keyed by connector class (a subclass inherits its base class's formula).

A formula tallies one image's FLOPs (unit ``image``; a high-resolution crop view: unit ``crop``) from what it reads —
one :class:`Features` per feature set: tokens per image, width, grid and which hidden states need gradients — and
returns :class:`Visual`: whether the visual tokens need gradients, the hidden states it read (the encoder's backward
path ends at the deepest), and what it writes into the LLM (DeepStack stacks, SVA re-aggregation).

* ``mlp`` / ``linear`` / ``identity``: the MLP on every token. ``moe_mlp``: the router on every token, ``top_k`` expert
  rows per token. ``dense``: the MLP on its token count (STI) or concatenated width (SCI, DCI).
* ``qformer``: per layer self-attention over the queries, cross-attention of the queries to the image tokens on the
  layers that have it (ℓ % ``cross_attn_every`` = 0), the query FFN; plus pre/post projections.
* ``resampler``: per layer the latents' queries, keys/values over [media; latents], attention, output, FFN.
* ``c_abstractor``: the RegNet stages' convolutions at the patch grid and at the pooled grid (1×1 and 3×3 depthwise
  convolutions at every position, squeeze-excite on one pooled position, the 1×1 shortcut of a stage's first block),
  then the readout MLP. (There is no D-Abstractor in mllm-kit; a deformable-attention formula would go here.)
* wrappers (``deepstack``, ``anyres``, ``matryoshka``): the inner connector per view; crops at unit ``crop``
  (``deepstack_vit`` sends its crops through the encoder only). Fusions: :mod:`mllm_kit.flops.fusions`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from mllm_kit.connectors.abstractor import CAbstractor
from mllm_kit.connectors.anyres import AnyResConnector
from mllm_kit.connectors.deepstack import DeepStackConnector, DeepStackViTConnector
from mllm_kit.connectors.dense import DenseConnector
from mllm_kit.connectors.matryoshka import MatryoshkaConnector
from mllm_kit.connectors.mlp import IdentityConnector, MLPConnector
from mllm_kit.connectors.moe import MoEMLPConnector
from mllm_kit.connectors.qformer import QFormerConnector
from mllm_kit.connectors.resampler import PerceiverResampler
from mllm_kit.flops.tally import CROP, IMAGE, ByClass, Tally, attention, conv, expert_mlp, is_projection, linear, sequential

CONNECTOR_FLOPS = ByClass("connector")
register_connector_flops = CONNECTOR_FLOPS.register


@dataclass(frozen=True)
class Features:
    """One feature set a connector reads, per image: ``tokens`` of ``width`` channels on ``grid``; ``grads[k]``: whether
    hidden state k needs a gradient; ``selected``: the default layer."""

    tokens: int
    width: int
    grid: tuple[int, int]
    grads: tuple[bool, ...]
    selected: int

    def grad(self, layer: int | None = None) -> bool:
        return self.grads[self.selected if layer is None else layer]


@dataclass(frozen=True)
class Context:
    """What else a connector may read: ``text_grad``, whether the instruction embeddings need gradients (MoVA's gate)."""

    text_grad: bool = False


@dataclass
class Visual:
    """A connector formula's result (see the module docstring). ``rewrite_flops(layer_grads, tally)`` tallies the
    re-aggregations inside the LLM once the LLM's flags at those layers are known; ``rewrites`` gives the flag each
    rewrite adds to the LLM stream, ``injections`` the flag of each stack added before an LLM layer."""

    grad: bool
    reads: list[int]
    injections: dict[int, bool] = field(default_factory=dict)
    rewrites: dict[int, bool] = field(default_factory=dict)
    rewrite_flops: Callable[[dict[int, bool], Tally], None] | None = None


Formula = Callable[[nn.Module, Sequence[Features], Tally, Context], Visual]


def connector_flops(connector: nn.Module, x: Sequence[Features], t: Tally, ctx: Context) -> Visual:
    """Tally ``connector`` per image into ``t`` (its registered formula)."""
    return CONNECTOR_FLOPS.lookup(connector)(connector, x, t, ctx)


def selected(x: Sequence[Features]) -> list[int]:
    return [f.selected for f in x]


def layers_of(module: nn.Module) -> list[nn.Module]:
    """An ``nn.Sequential``'s children, or the module itself (an ``nn.Identity``, a Linear)."""
    return list(module.children()) if isinstance(module, nn.Sequential) else [module]


@register_connector_flops(MLPConnector)
def mlp_flops(conn: MLPConnector, x, t: Tally, ctx: Context) -> Visual:
    f = x[0]
    return Visual(sequential(t, conn.mlp, f.tokens, IMAGE, f.grad()), selected(x))


@register_connector_flops(IdentityConnector)
def identity_flops(conn: IdentityConnector, x, t: Tally, ctx: Context) -> Visual:
    return Visual(x[0].grad(), selected(x))


@register_connector_flops(MoEMLPConnector)
def moe_mlp_flops(conn: MoEMLPConnector, x, t: Tally, ctx: Context) -> Visual:
    f = x[0]
    router = linear(t, conn.router, f.tokens, IMAGE, f.grad())
    experts = expert_mlp(t, conn.experts, f.tokens * conn.top_k, IMAGE, f.grad())
    return Visual(f.grad() or router or experts, selected(x))


@register_connector_flops(DenseConnector)
def dense_flops(conn: DenseConnector, x, t: Tally, ctx: Context) -> Visual:
    f = x[0]
    if conn.mode == "dci":
        read = max(f.selected, *(b - 1 for _, b in conn._groups(f.selected, len(f.grads))))
    else:
        read = max(f.selected, *conn._layers(len(f.grads) - 1))
    tokens = conn.num_tokens(f.tokens, f.grid)
    return Visual(sequential(t, conn.mlp, tokens, IMAGE, f.grads[read]), [read])


def _bert_attention(t: Tally, block: nn.Module, q_rows: int, kv_rows: int, grad_q: bool, grad_kv: bool) -> bool:
    """A Q-Former attention block (``Blip2QFormerAttention``): query/key/value, attention, output dense + LayerNorm."""
    attn = block.attention
    q = linear(t, attn.query, q_rows, IMAGE, grad_q)
    k = linear(t, attn.key, kv_rows, IMAGE, grad_kv)
    v = linear(t, attn.value, kv_rows, IMAGE, grad_kv)
    attention(t, q_rows * kv_rows, attn.query.out_features, IMAGE, q or k or v)
    out = linear(t, block.output.dense, q_rows, IMAGE, q or k or v)
    return grad_q or out or t.trains(block.output)


@register_connector_flops(QFormerConnector)
def qformer_flops(conn: QFormerConnector, x, t: Tally, ctx: Context) -> Visual:
    f = x[0]
    n, q = f.tokens, conn.num_queries
    image = sequential(t, layers_of(conn.pre_proj), n, IMAGE, f.grad() or t.trains(conn.vision_norm))
    grad = t.trains_param(conn.queries) or t.trains(conn.qformer.layernorm)
    for layer in conn.qformer.encoder.layer:
        grad = _bert_attention(t, layer.attention, q, q, grad, grad)
        if layer.has_cross_attention:
            grad = _bert_attention(t, layer.crossattention, q, n, grad, image)
        ffn = linear(t, layer.output_query.dense, q, IMAGE, linear(t, layer.intermediate_query.dense, q, IMAGE, grad))
        grad = grad or ffn or t.trains(layer.output_query)
    return Visual(sequential(t, layers_of(conn.post_proj), q, IMAGE, grad), selected(x))


@register_connector_flops(PerceiverResampler)
def resampler_flops(conn: PerceiverResampler, x, t: Tally, ctx: Context) -> Visual:
    f = x[0]
    n, latents = f.tokens, conn.num_latents
    media = linear(t, conn.proj, n, IMAGE, f.grad())
    grad = t.trains_param(conn.latents)
    for attn, ff in conn.blocks:
        lat = grad or t.trains(attn.norm_latents)
        q = linear(t, attn.to_q, latents, IMAGE, lat)
        kv = linear(t, attn.to_kv, n + latents, IMAGE, media or t.trains(attn.norm_media) or lat)  # keys/values: [media; latents]
        attention(t, latents * (n + latents), attn.heads * attn.head_dim, IMAGE, q or kv)
        grad = linear(t, attn.to_out, latents, IMAGE, q or kv) or grad
        grad = sequential(t, ff, latents, IMAGE, grad) or grad
    return Visual(grad or t.trains(conn.norm), selected(x))


def fixed(t: Tally, module: nn.Module, positions: int, grad: bool) -> bool:
    """Convolutions (stride 1, or on pooled maps: ``positions`` output positions) and projections of ``module`` in order."""
    if isinstance(module, nn.Conv2d):
        return conv(t, module, positions, IMAGE, grad)
    if is_projection(module):
        return linear(t, module, positions, IMAGE, grad)
    children = list(module.children())
    if not children:
        return grad or t.trains(module)
    for child in children:
        grad = fixed(t, child, positions, grad)
    return grad


def regstage(t: Tally, stage: nn.Module, grid: tuple[int, int], grad: bool) -> bool:
    """A timm ``RegStage`` of RegNet bottlenecks at stride 1 on a ``grid`` map: conv1 (1×1) → conv2 (3×3, grouped) →
    squeeze-excite (two 1×1 convolutions on the pooled map: one position) → conv3 (1×1), and the first block's 1×1
    shortcut convolution reading the block input."""
    if isinstance(stage, nn.Identity):
        return grad
    positions = grid[0] * grid[1]
    for block in stage.children():
        x = grad
        h = fixed(t, block.conv2, positions, fixed(t, block.conv1, positions, x))
        if not isinstance(block.se, nn.Identity):
            h = fixed(t, block.se, 1, h) or h
        h = fixed(t, block.conv3, positions, h)
        shortcut = block.downsample
        if shortcut is not None and not isinstance(shortcut, nn.Identity):
            x = fixed(t, shortcut, positions, x)
        grad = h or x
    return grad


@register_connector_flops(CAbstractor)
def c_abstractor_flops(conn: CAbstractor, x, t: Tally, ctx: Context) -> Visual:
    f = x[0]
    grad = regstage(t, conn.s1, conn.grid, f.grad() or t.trains_param(conn.pos_emb))
    grad = regstage(t, conn.s2, (conn.side, conn.side), grad)
    return Visual(sequential(t, conn.readout, conn.num_queries, IMAGE, grad), selected(x))


def inner_on_crops(t: Tally, inner: nn.Module, x: Sequence[Features], ctx: Context) -> Visual:
    """The inner connector on each high-resolution crop view (unit ``crop``)."""
    crops = t.child()
    visual = connector_flops(inner, x, crops, ctx)
    t.merge(crops.relabel({IMAGE: CROP}))
    return visual


@register_connector_flops(DeepStackConnector)
def deepstack_flops(conn: DeepStackConnector, x, t: Tally, ctx: Context) -> Visual:
    base = connector_flops(conn.inner, x, t, ctx)
    crops = inner_on_crops(t, conn.inner, x, ctx)
    return Visual(base.grad, base.reads, injections={layer: crops.grad for layer in conn.layers})


@register_connector_flops(DeepStackViTConnector, MatryoshkaConnector)
def inner_flops(conn: nn.Module, x, t: Tally, ctx: Context) -> Visual:
    return connector_flops(conn.inner, x, t, ctx)


@register_connector_flops(AnyResConnector)
def anyres_flops(conn: AnyResConnector, x, t: Tally, ctx: Context) -> Visual:
    base = connector_flops(conn.inner, x, t, ctx)
    crops = inner_on_crops(t, conn.inner, x, ctx)
    return Visual(base.grad or crops.grad or t.trains_param(conn.image_newline), base.reads)


def approximate(connector: nn.Module, x: Sequence[Features], t: Tally, ctx: Context, tokens: int) -> Visual:
    """A connector without a formula: every parameter used once per output token (2·P·N forward, its weights' and
    inputs' gradients as for one projection). Only for logging; :func:`mllm_kit.flops.step_flops` refuses it."""
    params = sum(p.numel() for p in connector.parameters())
    trains = t.trains(connector)
    grad = any(f.grad() for f in x)
    t.add(IMAGE, 2 * params * tokens, grad_in=grad, grad_w=trains)
    return Visual(grad or trains, selected(x))
