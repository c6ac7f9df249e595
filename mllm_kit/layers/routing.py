"""Top-k token routing and expert dispatch, shared by the MoE connector and the LLM's MoE layers.

Routing follows DeepSpeed's top-k gating as MoE-LLaVA and CuMo use it (specs/components.md §6.1, §6.5):
softmax over the router logits in fp32; the first choice is the argmax; for k = 2 the second choice is the
argmax with the first masked out, optionally over logits plus Gumbel noise. Slots within an expert's buffer
are handed out in routing order — every token's first choice (in token order), then every second choice —
and assignments beyond the capacity are dropped. Gates are the router probabilities of the kept
assignments, renormalised to sum to 1 per token (a token whose assignments were all dropped gets 0 and
passes through the residual only).

Dispatch groups the T·k (token, expert) pairs into an ``[E, C, D]`` buffer with one scatter, runs all
experts at once with batched matmuls, and gathers back — no Python loop over tokens or experts. C is the
largest expert load after capacity dropping (one host sync per routed layer), so compute is not spent on
empty capacity slots; without a capacity nothing is dropped. ``static=True`` sizes C from shapes alone — the
capacity, or T without one (no expert can receive more than every token) — so routing never waits for the device:
the choice for small, launch-bound layers on a GPU (the host sync made CuMo's connector 1.66× slower than running
every expert on an H100), for CUDA graphs and for ``torch.compile(fullgraph=True)``. Both give the same outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Routing:
    """``experts``/``gates``/``slots``/``kept``: ``[T, k]``; a dropped assignment has gate 0 and slot E·capacity, where
    ``capacity`` is the buffer's rows per expert (the largest kept load)."""

    experts: torch.Tensor
    gates: torch.Tensor
    slots: torch.Tensor
    kept: torch.Tensor
    capacity: int
    probs: torch.Tensor
    logits: torch.Tensor


def route(logits: torch.Tensor, top_k: int, capacity: int | None = None, noisy: bool = False, static: bool = False) -> Routing:
    """``logits [T, E]`` → :class:`Routing` (see the module docstring for the rules; ``static``: C from shapes only)."""
    logits = logits.float()
    t, e = logits.shape
    probs = logits.softmax(dim=-1)
    choices = [probs.argmax(dim=-1)]
    masked = logits
    if noisy:  # Gumbel noise on the logits for the later choices (DeepSpeed top-2 gating, training only)
        masked = logits - torch.empty_like(logits).exponential_().log()
    for _ in range(1, top_k):
        taken = F.one_hot(torch.stack(choices, dim=-1), e).sum(dim=1).bool()
        choices.append(masked.masked_fill(taken, float("-inf")).argmax(dim=-1))
    experts = torch.stack(choices, dim=-1)  # [T, k]
    order = F.one_hot(experts.t().reshape(-1), e)  # [k·T, E]: all first choices, then all second choices
    position = ((order.cumsum(dim=0) - 1) * order).sum(dim=-1).view(top_k, t).t()  # [T, k]
    kept = position < capacity if capacity is not None else torch.ones_like(position, dtype=torch.bool)
    if static:  # every expert gets `capacity` rows (T without one): no device value decides a shape
        capacity = min(capacity, t) if capacity is not None else t
    else:  # the largest load the capacity lets through: no compute on empty slots, at one host sync per layer
        largest = int(order.sum(dim=0).max())
        capacity = largest if capacity is None else min(capacity, largest)
    slots = torch.where(kept, experts * capacity + position, e * capacity)
    chosen = probs.gather(1, experts) * kept
    gates = chosen / chosen.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(chosen.dtype).eps)
    return Routing(experts, gates, slots, kept, capacity, probs, logits)


def dispatch(tokens: torch.Tensor, routing: Routing, num_experts: int,
             experts: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``tokens [T, D]`` → ``Σ_k gate_k · expert_k(token)`` ``[T, D_out]``; ``experts`` maps ``[E, C, D] → [E, C, D_out]``."""
    t, k = routing.slots.shape
    rows = num_experts * routing.capacity
    flat_slots = routing.slots.reshape(-1)
    # Row `rows` is a sink for dropped assignments; the experts never see it.
    buffer = tokens.new_zeros(rows + 1, tokens.shape[-1]).index_copy(0, flat_slots, tokens.repeat_interleave(k, dim=0))
    out = experts(buffer[:rows].view(num_experts, routing.capacity, -1)).reshape(rows, -1)
    # A dropped assignment reads any row back: its gate is 0, so it adds nothing (and gets no gradient).
    picked = out.index_select(0, flat_slots.clamp_max(rows - 1)).view(t, k, -1)
    return (picked * routing.gates.to(out.dtype).unsqueeze(-1)).sum(dim=1)


def balance_loss(probs: torch.Tensor, top1: torch.Tensor, num_experts: int) -> torch.Tensor:
    """E · Σ_e f_e · P_e: f_e the fraction of tokens whose first choice is e, P_e the mean router probability."""
    f = torch.bincount(top1, minlength=num_experts).to(probs.dtype) / top1.numel()
    return num_experts * (f * probs.mean(dim=0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of logsumexp(router logits)²."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def expert_load(top1: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Fraction of tokens whose first choice is each expert, ``[E]`` (for logging)."""
    return torch.bincount(top1, minlength=num_experts).float() / max(1, top1.numel())
