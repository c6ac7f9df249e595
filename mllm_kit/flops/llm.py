"""The language model's formulas: per position (unit ``token``), per attention pair (unit ``pair``), per instance-gate
row (unit ``sample``) and per LM-head row (unit ``row``).

Every decoder layer is read from the built modules, so any transformers decoder works without a per-architecture
table: the projections of its attention sublayer (q/k/v at their own widths — GQA's narrower k/v included — or a
fused qkv, then the output projection) and of its FFN (SwiGLU's gate/up/down: three matrices; fc1/fc2; Phi-3's fused
gate_up) on every position of the ``[B, T]`` input, padding included; attention over the (query, key) pairs the batch
holds (:class:`mllm_kit.flops.count.Units`) at heads × head dim, not halved for causality (the products are computed
whole, and MFU conventions count them so). Transforms are read from the modules they put in place: an upcycled MoE
FFN (router on every position + ``top_k`` expert rows), peft LoRA (A: d_in→r and B: r→d_out on every position beside
the frozen base), LoRA-MoE (all E experts' A/B, as it computes them, + its token router, or the instance gate once per
sample row). DeepStack stacks and SVA rewrites enter through the flags: a trained stack or re-aggregator makes the LLM
stream after it need gradients.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mllm_kit.flops.tally import PAIR, ROW, SAMPLE, TOKEN, Tally, linear, shape, sublayers, transformer_block
from mllm_kit.llm.base import LanguageModel


def attention_width(llm: LanguageModel) -> int:
    cfg = llm.model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(cfg.num_attention_heads * head_dim)


def text_grad(llm: LanguageModel, needs) -> bool:
    """Whether the token embeddings need gradients: the embedding matrix trains, or transformers' activation
    checkpointing hooked the embedding output to require them (``enable_input_require_grads``)."""
    embeddings = llm.model.get_input_embeddings()
    return any(needs(p) for p in embeddings.parameters()) or bool(getattr(llm.model, "_require_grads_hooks", None))


def _checkpointed(layer: nn.Module) -> bool:
    return bool(getattr(layer, "gradient_checkpointing", False)) and layer.training


def decoder_flops(llm: LanguageModel, t: Tally, grad: bool, injections: dict[int, bool] | None = None,
                  rewrites: dict[int, bool] | None = None, tally_of: Callable[[int], Tally] | None = None) -> list[bool]:
    """Tally every decoder layer into ``t`` (or into ``tally_of(layer)``: after a token drop, the layers of each
    stream are counted per their own positions); ``grad``: the input embeddings need gradients. Returns each layer's
    output flag (the hidden states an SVA rewrite after that layer reads)."""
    injections, rewrites = injections or {}, rewrites or {}
    width = attention_width(llm)
    out = []
    for i, layer in enumerate(llm.decoder_layers):
        t = tally_of(i) if tally_of is not None else t
        grad = grad or injections.get(i, False)
        sub = t.child()
        tail = None
        if sublayers(layer):
            after, tail = transformer_block(sub, layer, 1, TOKEN, 1, PAIR, width, grad)
        else:  # a layer whose projections cannot be found: every parameter once per position
            trains = sub.trains(layer)
            sub.add(TOKEN, 2 * sum(p.numel() for p in layer.parameters()), grad_in=grad, grad_w=trains)
            after = grad or trains
        t.merge(sub, recompute=after and _checkpointed(layer), tail=tail)
        out.append(after)
        grad = after or rewrites.get(i, False)
    return out


def scoring_flops(llm: LanguageModel, t: Tally, layer: int) -> None:
    """A token-dropping method's scoring at ``layer`` (:mod:`mllm_kit.efficiency.scoring`): the keys of every position
    through the layer's k projection (no gradients). Its queries (a few per sample) and their scores are left out:
    < 1/(heads·head dim) of this."""
    attn = llm.decoder_layers[layer].self_attn
    k = attn.k_proj if hasattr(attn, "k_proj") else attn.qkv_proj  # a fused projection runs whole
    d_out, d_in = shape(getattr(k, "base_layer", k).weight)
    t.add(TOKEN, 2 * d_in * d_out)


def gate_flops(llm: LanguageModel, t: Tally, text: bool) -> None:
    """LoRA-MoE's instance gate: the mean instruction embedding of each sample row times ``[D, E]``."""
    gate = getattr(llm, "lora_moe_gate", None)
    if gate is not None:
        d, e = shape(gate.weight)
        t.add(SAMPLE, 2 * d * e, grad_in=text, grad_w=t.trains(gate))


def head_flops(llm: LanguageModel, t: Tally, grad: bool) -> bool:
    """The LM head on one row (unit ``row``); ``grad``: the final hidden states need gradients."""
    return linear(t, llm.model.get_output_embeddings(), 1, ROW, grad)
