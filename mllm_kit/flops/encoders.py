"""Vision-encoder formulas: FLOPs per view (one image or one high-resolution crop through the encoder).

* ViTs (HF CLIP / SigLIP / DINOv2, timm ViTs): the patch-embedding convolution, then per block the projections on all
  ``n`` tokens (patches + prefix tokens) and attention over ``n²`` pairs at the attention width; SigLIP's
  attention-pooling head (one probe query) runs but nothing reads it: forward only.
* timm ConvNeXt: the stem and every stage's convolutions and channel MLPs at that stage's resolution (the sizes follow
  each convolution's kernel, stride and padding).
* A mixture: the sum of its members, each at its own resolution.

Every block runs — HF towers compute all their layers whatever ``select_layer`` — but only blocks up to the deepest
hidden state the connector reads are on the backward path: the others cost their forward alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mllm_kit.encoders.base import VisionEncoder
from mllm_kit.encoders.hf import HFVisionEncoder
from mllm_kit.encoders.mixture import MixtureEncoder
from mllm_kit.encoders.timm_convnext import TimmConvNeXtEncoder
from mllm_kit.encoders.timm_vit import TimmVisionEncoder
from mllm_kit.flops.tally import (
    VIEW,
    ByClass,
    Needs,
    Tally,
    attention,
    conv,
    conv_out,
    is_projection,
    linear,
    sequential,
    transformer_block,
)

ENCODER_FLOPS = ByClass("encoder")
register_encoder_flops = ENCODER_FLOPS.register


def members(encoder: VisionEncoder) -> list[VisionEncoder]:
    """The encoders behind each feature set the connector reads: a mixture's members, else the encoder itself."""
    return list(encoder.members.values()) if isinstance(encoder, MixtureEncoder) else [encoder]


def hidden_grads(encoder: VisionEncoder, needs: Needs) -> list[bool]:
    """For a single encoder's hidden states 0 … ``num_layers``: whether each needs a gradient (something before it trains)."""
    blocks = list(encoder.blocks)
    inside = {id(p) for b in blocks for p in b.parameters()}
    grad = any(needs(p) for p in encoder.parameters() if id(p) not in inside)  # embeddings, position / class tokens
    out = [grad]
    for block in blocks:
        grad = grad or any(needs(p) for p in block.parameters())
        out.append(grad)
    return out


def _never(param: nn.Parameter) -> bool:
    return False


def _checkpointed(encoder: VisionEncoder, block: nn.Module) -> bool:
    # HF layers checkpoint themselves (GradientCheckpointingLayer, in training mode); timm blocks through run_block.
    hf = bool(getattr(block, "gradient_checkpointing", False)) and block.training
    return hf or (encoder.checkpoint_blocks and not isinstance(encoder, HFVisionEncoder))


def attention_width(block: nn.Module) -> int:
    """Heads × head dim of the first attention module inside ``block``."""
    for m in block.modules():
        heads = next((getattr(m, a) for a in ("num_heads", "num_attention_heads") if isinstance(getattr(m, a, None), int)), None)
        dim = next((getattr(m, a) for a in ("head_dim", "attention_head_size") if isinstance(getattr(m, a, None), int)), None)
        if heads and dim:
            return heads * dim
    raise ValueError(f"cannot find the attention heads of {type(block).__name__} (no num_heads × head_dim).")


def _blocks(t: Tally, encoder: VisionEncoder, read: int, grad: bool, run) -> None:
    """``run(tally, index, block, grad) -> (grad, tail)`` per block (the tail: what a checkpointed replay skips); blocks
    past ``read`` are forward only."""
    for i, block in enumerate(encoder.blocks, start=1):
        on_path = i <= read
        sub = t.child() if on_path else Tally(_never)
        out, tail = run(sub, i, block, grad and on_path)
        t.merge(sub, recompute=on_path and out and _checkpointed(encoder, block), tail=tail)
        grad = out


@register_encoder_flops(HFVisionEncoder, TimmVisionEncoder)
def vit_flops(encoder: VisionEncoder, t: Tally, reads: Sequence[int]) -> None:
    h, w = encoder.patch_grid
    n = h * w + encoder.num_prefix_tokens
    patch = next(m for m in encoder.model.modules() if isinstance(m, nn.Conv2d))
    conv(t, patch, h * w, VIEW, grad=False)
    width = attention_width(encoder.blocks[0])
    _blocks(t, encoder, reads[0], hidden_grads(encoder, t.needs)[0],
            lambda sub, i, block, grad: transformer_block(sub, block, n, VIEW, n * n, VIEW, width, grad))
    _pooling_head(Tally(_never), getattr(encoder.model, "head", None), n, t)


def _pooling_head(off_path: Tally, head: nn.Module | None, n: int, t: Tally) -> None:
    """SigLIP's attention-pooling head: one probe query over the ``n`` tokens, then an MLP on it (forward only)."""
    mha = getattr(head, "attention", None)
    if not isinstance(mha, nn.MultiheadAttention):
        return
    c = mha.embed_dim
    off_path.add(VIEW, 2 * c * c + 2 * n * c * 2 * c + 2 * c * c)  # q in-projection (1 row), k/v (n rows), out-projection
    attention(off_path, n, c, VIEW, grad=False)
    sequential(off_path, head.mlp.children(), 1, VIEW, grad=False)
    t.merge(off_path)


def _spatial(t: Tally, module: nn.Module, size: tuple[int, int], grad: bool) -> tuple[tuple[int, int], bool]:
    """Convolutions and channel projections of ``module`` in registration order, tracking the feature map's size."""
    if isinstance(module, nn.Conv2d):
        size = conv_out(size, module)
        return size, conv(t, module, size[0] * size[1], VIEW, grad)
    if is_projection(module):
        return size, linear(t, module, size[0] * size[1], VIEW, grad)
    children = list(module.children())
    if not children:
        return size, grad or t.trains(module)
    for child in children:
        size, grad = _spatial(t, child, size, grad)
    return size, grad


@register_encoder_flops(TimmConvNeXtEncoder)
def convnext_flops(encoder: TimmConvNeXtEncoder, t: Tally, reads: Sequence[int]) -> None:
    size, _ = _spatial(t, encoder.model.stem, (encoder.image_size, encoder.image_size), grad=False)
    state = {"size": size}

    def stage(sub: Tally, i: int, block: nn.Module, grad: bool) -> tuple[bool, None]:
        state["size"], out = _spatial(sub, block, state["size"], grad)
        return out, None  # a stage ends in its last block's layer scale: replayed whole

    _blocks(t, encoder, reads[0], hidden_grads(encoder, t.needs)[0], stage)


@register_encoder_flops(MixtureEncoder)
def mixture_flops(encoder: MixtureEncoder, t: Tally, reads: Sequence[int]) -> None:
    for member, read in zip(encoder.members.values(), reads):
        ENCODER_FLOPS.lookup(member)(member, t, [read])


def approximate_encoder(encoder: VisionEncoder, t: Tally) -> None:
    """An encoder without a formula: every parameter once per token of a view (see ``connectors.approximate``)."""
    params = sum(p.numel() for p in encoder.parameters())
    t.add(VIEW, 2 * params * encoder.num_tokens, grad_in=False, grad_w=t.trains(encoder))
