"""The LM head applied only where a loss reads it, in chunks (the memory behaviour of docs/distillation.md).

A full forward's logits are ``[B, T, V]`` in fp32 — for a 152K vocabulary that is most of a step's memory, yet
LLaVA's alignment stage supervises ~10 % of the positions. Objectives therefore receive the final hidden states
``[B, T, D]`` and the head: they gather the ``M`` rows they need (:func:`next_token_rows`, :func:`token_rows`),
and :func:`chunked_sum` evaluates ``head`` + loss ``chunk_size`` rows at a time, recomputing each chunk's logits in
backward (activation checkpointing) so that at most one ``[chunk, V]`` block is alive. Peak memory then grows with
the supervised tokens, not with sequence × vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from mllm_kit.batch import IGNORE_INDEX

CHUNK_SIZE = 1024


def _flat_index(mask: torch.Tensor, count: int | None) -> torch.Tensor:
    # A host-known count avoids the device sync that a data-dependent nonzero() costs on GPU.
    flat = mask.reshape(-1)
    return flat.nonzero().squeeze(1) if count is None else torch.nonzero_static(flat, size=count).squeeze(1)


def next_token_rows(labels: torch.Tensor, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions whose *next* token is supervised → ``(index [M] into the flattened [B·T], targets [M])``.

    Position ``t`` predicts ``labels[t + 1]`` (the causal shift); ``count``: ``M`` when the host knows it
    (``Batch.num_loss_tokens``). Rows come in (sample, position) order, so two views of the same samples with the
    same supervised tokens give aligned rows.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    index = _flat_index(mask, count)
    return index, labels.reshape(-1)[index + 1]


def token_rows(mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """``[B, T]`` bool → index ``[M]`` into the flattened ``[B·T]``, in (sample, position) order."""
    return _flat_index(mask, count)


def gather(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[B, T, D]``, ``[M]`` → ``[M, D]`` (a view of ``hidden`` is flattened, nothing else is copied)."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)


def chunked_sum(fn: Callable[..., torch.Tensor], *rows: torch.Tensor, chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """``Σ_chunks fn(*row_chunks)`` over ``[M, ...]`` tensors split along dim 0; ``fn`` returns a tensor of fixed shape.

    With gradients enabled and more than one chunk, each chunk is checkpointed: its ``[chunk, V]`` logits are freed
    after the forward and recomputed in backward.
    """
    m = rows[0].shape[0]
    if m <= chunk_size:  # also M = 0: fn on empty rows gives its zero, connected to the graph
        return fn(*rows)
    checkpointed = torch.is_grad_enabled() and any(r.requires_grad for r in rows)
    total = None
    for start in range(0, m, chunk_size):
        part = [r[start : start + chunk_size] for r in rows]
        value = checkpoint(fn, *part, use_reentrant=False) if checkpointed else fn(*part)
        total = value if total is None else total + value
    return total


def head_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                       count: int | None = None, chunk_size: int = CHUNK_SIZE,
                       weights: torch.Tensor | None = None) -> tuple[torch.Tensor, int | torch.Tensor]:
    """Next-token cross-entropy summed over supervised positions → ``(loss_sum, M)``; equals
    :func:`~mllm_kit.objectives.base.shifted_token_ce` on the full logits, without materialising them. ``weights``
    ``[B, T]`` (at the labels' positions, :attr:`~mllm_kit.batch.Batch.loss_weights`) weigh each target's term."""
    index, targets = next_token_rows(labels, count)
    if weights is None:
        def ce(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")

        return chunked_sum(ce, gather(hidden, index), targets, chunk_size=chunk_size), index.shape[0]

    def weighted_ce(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.cross_entropy(head(h).float(), y, reduction="none") * w).sum()

    w = weights.reshape(-1).index_select(0, index + 1).float()
    return chunked_sum(weighted_ce, gather(hidden, index), targets, w, chunk_size=chunk_size), w.sum()
