"""The counting kit every formula uses: FLOPs per unit of work, with the backward pass and recomputation that follow
from which tensors need gradients.

Conventions (:mod:`mllm_kit.flops` states them once for the whole package):

* only matrix products count — linear layers, convolutions, the two products of attention — at 2 FLOPs per
  multiply-add; norms, activations, softmax, pooling, interpolation, routing bookkeeping and biases do not;
* the backward of a product costs one forward for the input's gradient when its input needs one, and one more for the
  weight's gradient when its weight trains (``torch.autograd`` computes exactly those); attention's backward costs two
  forwards when its queries, keys or values need gradients (the gradient products only: a fused kernel's recomputation
  of the score matrix inside its backward is neither model nor hardware FLOPs here);
* a block under activation checkpointing that the backward pass goes through runs its forward once more
  (``recompute``) — up to its last operation that saved an activation, where PyTorch's non-reentrant checkpoint stops
  the replay (:func:`transformer_block`): hardware FLOPs, not model FLOPs.

A :class:`Tally` accumulates, per *unit* (an encoder view, an LLM position, ...), the forward, backward and recomputed
FLOPs of one part; a formula walks a module in execution order and threads a ``grad`` flag — whether the activation
it reads needs a gradient — through the helpers below, each returning the flag of its output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

Needs = Callable[[nn.Parameter], bool]

# Units of work (what a rate is "per"): counted on the host for each batch (mllm_kit.flops.count.Units).
VIEW, IMAGE, CROP, TOKEN, PAIR, SAMPLE, ROW = "view", "image", "crop", "token", "pair", "sample", "row"


@dataclass
class Rate:
    forward: float = 0.0
    backward: float = 0.0
    recompute: float = 0.0


class Tally:
    """FLOPs per unit of one part; ``needs(parameter)`` says whether a parameter gets a gradient in this step."""

    def __init__(self, needs: Needs) -> None:
        self.needs = needs
        self.rates: dict[str, Rate] = {}

    def child(self) -> Tally:
        return Tally(self.needs)

    def add(self, unit: str, flops: float, grad_in: bool = False, grad_w: bool = False) -> None:
        """One product of ``flops`` forward FLOPs per ``unit``; its backward per the flags (see the module docstring)."""
        rate = self.rates.setdefault(unit, Rate())
        rate.forward += flops
        rate.backward += flops * (int(bool(grad_in)) + int(bool(grad_w)))

    def merge(self, other: Tally, recompute: bool = False, tail: Tally | None = None) -> None:
        """Add ``other``'s rates; ``recompute``: ``other`` is a checkpointed block the backward runs through, whose
        forward runs again except its ``tail`` (what the replay stops before)."""
        for unit, r in other.rates.items():
            rate = self.rates.setdefault(unit, Rate())
            rate.forward += r.forward
            rate.backward += r.backward
            skipped = tail.rates[unit].forward if tail is not None and unit in tail.rates else 0.0
            rate.recompute += r.recompute + (r.forward - skipped if recompute else 0.0)

    def trains(self, module: nn.Module | None) -> bool:
        return module is not None and any(self.needs(p) for p in module.parameters())

    def trains_param(self, param: nn.Parameter | None) -> bool:
        return param is not None and self.needs(param)

    def relabel(self, renames: dict[str, str]) -> Tally:
        """A copy whose units are renamed (e.g. a connector's per-image rates as per-crop rates)."""
        out = self.child()
        for unit, r in self.rates.items():
            rate = out.rates.setdefault(renames.get(unit, unit), Rate())
            rate.forward += r.forward
            rate.backward += r.backward
            rate.recompute += r.recompute
        return out


def shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's full shape, also when DeepSpeed ZeRO-3 has replaced it by an empty shard (``ds_shape``)."""
    return tuple(getattr(param, "ds_shape", None) or param.shape)


# -- projections: nn.Linear and the wrappers transforms put around it ------------------------------------------------
def _is_lora(module: nn.Module) -> bool:  # peft's LoRA layers, without importing peft
    return hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)


def _is_lora_moe(module: nn.Module) -> bool:  # mllm_kit.llm.lora_moe.LoRAMoELinear, without importing the LLM package
    return hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), nn.Parameter)


def is_projection(module: nn.Module) -> bool:
    """A Linear layer, or a LoRA / LoRA-MoE layer wrapping one (counted as one unit, never descended into)."""
    return isinstance(module, nn.Linear) or _is_lora(module) or _is_lora_moe(module)


def projections(module: nn.Module) -> list[nn.Module]:
    """The projections inside ``module`` in registration order (wrappers as one, their insides skipped)."""
    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        if is_projection(m):
            found.append(m)
            return
        for child in m.children():
            visit(child)

    visit(module)
    return found


def linear(t: Tally, module: nn.Module, rows: float, unit: str, grad: bool, tail: Tally | None = None) -> bool:
    """``rows`` rows per ``unit`` through a projection whose input needs a gradient iff ``grad``; returns the output's
    flag. ``tail``: where the projection's final product goes when nothing saves its output (see
    :func:`transformer_block`) — a plain Linear's one product, a LoRA layer's B (A's output is what B saves)."""
    last = tail if tail is not None else t
    if _is_lora(module):
        adapters = [n for n in module.active_adapters if n in module.lora_A]
        if getattr(module, "merged", False) or getattr(module, "disable_adapters", False) or not adapters:
            return linear(t, module.base_layer, rows, unit, grad, tail)
        out = linear(t, module.base_layer, rows, unit, grad)
        for i, name in enumerate(adapters):
            mid = linear(t, module.lora_A[name], rows, unit, grad)
            out = linear(last if i == len(adapters) - 1 else t, module.lora_B[name], rows, unit, mid) or out
        return out
    if _is_lora_moe(module):
        base = module.base_layer
        n_experts, d_in, r = shape(module.lora_A)
        d_out = shape(module.lora_B)[2]
        out = linear(t, base, rows, unit, grad)
        a, b = t.trains_param(module.lora_A), t.trains_param(module.lora_B)
        if module.router is not None:  # a token-level router on the layer's own input
            router = linear(t, module.router, rows, unit, grad)
        else:  # the instance gate is tallied once per sample (mllm_kit.flops.llm)
            router = t.trains(module.__dict__.get("gate"))
        t.add(unit, 2 * rows * d_in * n_experts * r, grad_in=grad, grad_w=a)
        mid = grad or a or router
        last.add(unit, 2 * rows * n_experts * r * d_out, grad_in=mid, grad_w=b)
        return out or mid or b
    w = t.trains_param(module.weight)
    last.add(unit, 2 * rows * module.in_features * module.out_features, grad_in=grad, grad_w=w)
    return grad or w or t.trains_param(module.bias)


def sequential(t: Tally, modules: Iterable[nn.Module], rows: float, unit: str, grad: bool) -> bool:
    """Projections applied one after another (an MLP: ``build_mlp``, an ``nn.Sequential``), anything else passed over
    (a norm or activation: its parameters still make the next input need a gradient)."""
    for m in modules:
        if is_projection(m):
            grad = linear(t, m, rows, unit, grad)
        else:
            grad = grad or t.trains(m)
    return grad


def attention(t: Tally, pairs: float, width: int, unit: str, grad: bool) -> None:
    """Scores ``Q·Kᵀ`` and ``P·V`` over ``pairs`` (query, key) pairs per ``unit`` at total width ``width`` (heads ×
    head dim): 4·pairs·width FLOPs; backward 2× when queries, keys or values need gradients."""
    t.add(unit, 4 * pairs * width, grad_in=grad, grad_w=grad)  # two gradient products per forward product


def conv(t: Tally, module: nn.Conv2d, positions: float, unit: str, grad: bool) -> bool:
    """A 2-D convolution with ``positions`` output positions per ``unit``."""
    kh, kw = module.kernel_size
    flops = 2 * positions * (module.in_channels // module.groups) * kh * kw * module.out_channels
    w = t.trains_param(module.weight)
    t.add(unit, flops, grad_in=grad, grad_w=w)
    return grad or w or t.trains_param(module.bias)


def conv_out(size: tuple[int, int], module: nn.Conv2d) -> tuple[int, int]:
    """Output ``(height, width)`` of ``module`` on an input of ``size``."""
    out = []
    for n, k, s, p, d in zip(size, module.kernel_size, module.stride, module.padding, module.dilation):
        out.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
    return out[0], out[1]


def expert_mlp(t: Tally, experts: nn.Module, rows: float, unit: str, grad: bool) -> bool:
    """``rows`` routed rows per ``unit`` through ``mllm_kit.layers.experts.ExpertMLP`` (each row: one token through one
    expert): layer 0 (and the gated FFN's up projection) read the routed input, the later layers their predecessor."""
    out = grad
    firsts = [experts.w0] + ([experts.w_up] if experts.gated else [])
    for w in firsts:
        _, d_in, d_out = shape(w)
        trains = t.trains_param(w)
        t.add(unit, 2 * rows * d_in * d_out, grad_in=grad, grad_w=trains)
        out = out or trains
    for i in range(1, experts.depth):
        w = getattr(experts, f"w{i}")
        _, d_in, d_out = shape(w)
        trains = t.trains_param(w)
        t.add(unit, 2 * rows * d_in * d_out, grad_in=out, grad_w=trains)
        out = out or trains
    return out or t.trains(experts)


# -- a transformer block: an attention sublayer, then MLP-like sublayers ----------------------------------------------
def sublayers(block: nn.Module) -> list[nn.Module]:
    """The direct children of ``block`` that hold projections (or experts), in registration order: attention first."""
    return [c for c in block.children() if projections(c) or _is_sparse_moe(c)]


def _is_sparse_moe(module: nn.Module) -> bool:  # mllm_kit.llm.moe.SparseMoE
    return hasattr(module, "experts") and hasattr(module, "router") and hasattr(module, "top_k")


def transformer_block(t: Tally, block: nn.Module, rows: float, unit: str, pairs: float, pair_unit: str, width: int,
                      grad: bool) -> tuple[bool, Tally]:
    """A pre- or post-norm residual block (HF CLIP/SigLIP/DINOv2/Llama/Qwen2/... layers, timm ViT blocks).

    ``rows`` positions per ``unit`` go through every projection; attention covers ``pairs`` (query, key) pairs per
    ``pair_unit`` at ``width`` = heads × head dim. In the attention sublayer every projection but the last (the output
    projection) reads the block input; in an MLP sublayer every projection but the last reads the sublayer input, the
    last reads their product; an upcycled MoE FFN routes ``top_k`` rows per position.

    Returns the output's flag and the *tail*: what activation checkpointing does not recompute. PyTorch's
    non-reentrant checkpoint replays a block only until every activation saved for backward exists again; the block's
    final FFN product feeds only the residual addition, so nothing saves its output and it is not replayed (a LoRA
    ``down_proj``: its B) — unless a layer scale multiplies it (DINOv2, timm ``LayerScale``), or the FFN is an MoE
    layer (the gates multiply the experts' outputs).
    """
    parts = sublayers(block)
    others = [c for c in block.children() if c not in parts]
    grad = grad or any(t.trains(c) for c in others)  # norms, layer scales: trained ones make the stream need gradients
    tail = t.child()
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        if _is_sparse_moe(part):
            grad = sparse_moe(t, part, rows, unit, grad)
            continue
        projs = projections(part)
        if k == 0:
            grad = attention_sublayer(t, projs, rows, unit, pairs, pair_unit, width, grad) or t.trains(part)
            continue
        grad = fan_in(t, projs, rows, unit, grad, tail=tail if last else None) or grad or t.trains(part)
    t.merge(tail)
    scaled = any("LayerScale" in type(c).__name__ for c in others)
    return grad, (t.child() if scaled else tail)


def fan_in(t: Tally, projs: list[nn.Module], rows: float, unit: str, grad: bool, tail: Tally | None = None) -> bool:
    """Every projection but the last reads the same input (gate and up, fc1); the last reads what they made (down, fc2;
    its final product into ``tail`` when given). Returns the last's output flag."""
    inner = grad
    for p in projs[:-1]:
        inner = linear(t, p, rows, unit, grad) or inner
    return linear(t, projs[-1], rows, unit, inner, tail=tail)


def attention_sublayer(t: Tally, projs: list[nn.Module], rows: float, unit: str, pairs: float, pair_unit: str, width: int,
                       grad: bool) -> bool:
    """Self-attention: the input projections (q, k, v or a fused qkv) on ``rows``, attention over ``pairs`` at
    ``width``, the output projection (the last one registered) on ``rows``; returns the residual stream's flag."""
    inner = grad
    for p in projs[:-1]:
        inner = linear(t, p, rows, unit, grad) or inner
    attention(t, pairs, width, pair_unit, inner)
    return linear(t, projs[-1], rows, unit, inner) or grad


def sparse_moe(t: Tally, moe: nn.Module, rows: float, unit: str, grad: bool) -> bool:
    """``mllm_kit.llm.moe.SparseMoE``: the router on every position, ``top_k`` expert rows per position (the model
    FLOPs of routing: the buffer rows that capacity leaves empty or that overflow drops are not counted)."""
    router = linear(t, moe.router, rows, unit, grad)
    out = expert_mlp(t, moe.experts, rows * moe.top_k, unit, grad)
    return grad or router or out


class FlopsUnavailable(LookupError):
    """No FLOP formula is registered for a component's class (nor for any of its base classes)."""


class ByClass:
    """Formulas keyed by component class; a subclass without its own formula uses its nearest base class's."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._formulas: dict[type, Callable] = {}

    def register(self, *classes: type) -> Callable[[Callable], Callable]:
        def decorator(fn: Callable) -> Callable:
            for cls in classes:
                self._formulas[cls] = fn
            return fn

        return decorator

    def lookup(self, obj: object) -> Callable:
        for cls in type(obj).__mro__:
            if cls in self._formulas:
                return self._formulas[cls]
        raise FlopsUnavailable(f"no FLOP formula for the {self.kind} {type(obj).__name__}; register one with "
                               f"mllm_kit.flops.register_{self.kind}_flops({type(obj).__name__}) (see mllm_kit/flops/).")

    def covers(self, cls: type) -> bool:
        return any(c in self._formulas for c in cls.__mro__)
