"""One call of the decoder with its layer steps (:mod:`mllm_kit.llm.steps`) installed as hooks for that call only.

:class:`DecodeCall` registers, on the transformers modules, exactly the hooks its steps need — a pre-hook on the
decoder (which pass is this: the forward that sees the prompt, or a decode pass on the KV cache), pre/post hooks on
the decoder layers that steps act at, a pre-hook on the final norm when tokens are dropped, keyword-argument hooks on
bound sub-modules — and removes them in a ``finally`` when the call ends. Any transformers decoder works without a
copy of its loop: the layers' keyword arguments (``attention_mask``, ``position_ids``, ``position_embeddings``) are
substituted after a drop.

Dropping (:class:`~mllm_kit.llm.steps.TokenDrop`). The live *stream* is the set of original positions the layers run
on: ``index [B, T']`` (an original column per slot; rows that keep fewer positions end in filler slots, index ``T``)
and ``real [B, T']``. The first drop leaves the padding behind too when the batch's row lengths are known (every
collated batch knows them; otherwise padding stays in the stream, masked as keys); later drops remove image positions.
Every count is known on the host (kept tokens per image), so shapes never wait on the device. After a drop the layers
get a mask built here — causal over original order, the batch's padding, one packed sample per segment — in the
format of the model's attention implementation (boolean for ``sdpa``, additive for ``eager``). In the decode passes
of ``generate`` the layers from K on read a KV cache of the kept slots only: their mask covers those slots plus the
generated tokens, and with ``compact`` positions the new tokens' positions are shifted by what was dropped.

Activation checkpointing: transformers (≥ 5.23) checkpoints a layer's ``forward`` with the layer's hooks outside the
checkpoint, so layer-level hooks are not re-run in backward; hooks on modules *inside* a layer
(:class:`~mllm_kit.llm.steps.Bind`) are. The checkpoint's recompute context (:func:`recompute_context`, passed as
``context_fn``) re-binds the arguments of the call that ran the forward while its layers are recomputed.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mllm_kit.context import ForwardContext
from mllm_kit.errors import ConfigError
from mllm_kit.llm.attention import attention_format, cache_of, final_norm, gather_rope, ranks, rotary, sliding_window
from mllm_kit.llm.steps import Bind, Injection, LayerStep, Rewrite, TokenDrop, dropped_by

_ACTIVE: contextvars.ContextVar[DecodeCall | None] = contextvars.ContextVar("mllm_kit_decode_call", default=None)


@dataclass
class Stream:
    """The slots layers ``start`` … run on after a drop (see the module docstring). ``mask``: the layers' attention
    mask for the prompt pass; ``position_ids`` ``[B, T']`` and ``position_embeddings`` (cos, sin) likewise;
    ``dropped``: original positions dropped so far per row (host), for ``compact`` positions in decode passes."""

    start: int
    index: torch.Tensor
    real: torch.Tensor
    valid: torch.Tensor
    lengths: list[int]
    images: tuple[torch.Tensor, torch.Tensor]
    counts: list[int]
    mask: Any
    position_ids: torch.Tensor
    position_embeddings: Any
    compact: bool
    dropped: list[int]


class DecodeCall:
    """The steps of one call over ``ctx``, and that call's state (which pass it is, the streams after its drops). Used as a
    context manager around the transformers forward (or ``generate``) it applies to:
    ``with llm.stepping(ctx, steps) as call``."""

    def __init__(self, llm: nn.Module, ctx: ForwardContext, steps: Sequence[LayerStep]) -> None:
        self.llm, self.ctx = llm, ctx
        self.steps = tuple(steps)
        self.depth = len(llm.decoder_layers)
        self.drops = sorted((s for s in self.steps if isinstance(s, TokenDrop)), key=lambda s: s.layer)
        self._check()
        self.prompt_pass = True
        self.streams: list[Stream] = []
        self._full: torch.Tensor | None = None
        self._scores: dict[int, torch.Tensor] = {}
        self.layer_kwargs: dict[str, Any] = {}
        self.layer = -1

    # -- what steps read --------------------------------------------------------------------------------------------
    def stream(self, layer: int | None = None) -> Stream | None:
        """The stream layer ``layer`` (default: the current one) runs on; ``None`` before any drop."""
        layer = self.layer if layer is None else layer
        current = None
        for s in self.streams:
            if s.start <= layer:
                current = s
        return current

    def image_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, cols)`` ``[M]`` of the live image slots in the current layer's hidden states, image by image."""
        s = self.stream()
        return self.ctx.image_positions if s is None else s.images

    def image_counts(self) -> list[int]:
        """Live tokens of each image (host)."""
        s = self.stream()
        return list(self.ctx.tokens_per_image) if s is None else list(s.counts)

    def slot_index(self) -> torch.Tensor:
        """``[B, T']``: the original column of each slot of the current layer (fillers: ``T``)."""
        s = self.stream()
        if s is not None:
            return s.index
        b, t = self.ctx.shape
        return torch.arange(t, device=self.ctx.input_ids.device).expand(b, t)

    def slot_real(self) -> torch.Tensor:
        s = self.stream()
        return torch.ones(self.ctx.shape, dtype=torch.bool, device=self.ctx.input_ids.device) if s is None else s.real

    # -- installation -------------------------------------------------------------------------------------------------
    def __enter__(self) -> DecodeCall:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.installed())
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)
        self._stack.close()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Every hook of this call registered, removed on exit (also on an exception)."""
        handles = []
        try:
            if not any(s.layer >= 0 for s in self.steps):
                with self.bindings():
                    yield
                return
            decoder = self.llm.model.get_decoder()
            handles.append(decoder.register_forward_pre_hook(self._on_decoder, with_kwargs=True))
            first_drop = min((d.scored_at for d in self.drops), default=self.depth)  # from here on layers may run on a stream
            for i, layer in enumerate(self.llm.decoder_layers):
                if i >= first_drop or any(s.layer == i for s in self.steps if isinstance(s, Injection)):
                    handles.append(layer.register_forward_pre_hook(self._pre_layer(i), with_kwargs=True))
                if any(s.layer == i for s in self.steps if isinstance(s, Rewrite)):
                    handles.append(layer.register_forward_hook(self._post_layer(i)))
            if self.drops:
                handles.append(final_norm(self.llm).register_forward_pre_hook(self._restore))
            with self.bindings():
                yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def bindings(self) -> Iterator[None]:
        """The call's :class:`~mllm_kit.llm.steps.Bind` arguments on their modules for the block."""
        handles = [h for step in self.steps if isinstance(step, Bind) for h in bind(step.modules, step.kwargs)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _check(self) -> None:
        for step in self.steps:
            if isinstance(step, Bind):
                continue
            if not 0 <= step.layer < self.depth:
                raise ConfigError(f"a layer step ({type(step).__name__}) acts at LLM layer {step.layer}, but the LLM has "
                                  f"{self.depth} decoder layers (0..{self.depth - 1}).")
        for drop in self.drops:
            if drop.layer < 1 or not 0 <= drop.scored_at <= drop.layer:
                raise ConfigError(f"{type(drop).__name__}: tokens can be dropped from layer 1 on (scored at a layer ≤ the drop "
                                  f"layer); got layer {drop.layer}, scored at {drop.scored_at}.")
        if self.drops:
            first = self.drops[0].layer
            late = [s for s in self.steps if isinstance(s, Injection) and s.layer > first or isinstance(s, Rewrite) and s.layer >= first]
            if late:
                raise ConfigError(f"{type(late[0]).__name__} at LLM layer {late[0].layer} writes into image positions that "
                                  f"{type(self.drops[0]).__name__} drops from layer {first}; drop later or inject earlier.")

    # -- hooks ----------------------------------------------------------------------------------------------------------
    def _on_decoder(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = cache_of(kwargs)
        self.prompt_pass = cache is None or cache.get_seq_length() == 0
        if self.prompt_pass:
            self.streams, self._full, self._scores = [], None, {}

    def _pre_layer(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.layer = i
            # At a drop layer the prompt pass arrives on the previous stream; decode passes read this layer's cache.
            dropping_here = self.prompt_pass and any(d.layer == i for d in self.drops)
            stream = self.stream(i - 1 if dropping_here else i)
            if stream is not None:
                kwargs = self._substitute(stream, kwargs, hidden, i)
            self.layer_kwargs = kwargs
            for step in self.steps:
                if isinstance(step, Injection) and step.layer == i and (self.prompt_pass or step.every_pass):
                    hidden = step.before(hidden, self)
            if self.prompt_pass:
                for drop in self.drops:
                    if drop.scored_at == i:
                        with torch.no_grad():
                            self._scores[id(drop)] = drop.score(hidden, self)
                for drop in self.drops:
                    if drop.layer == i:
                        hidden, kwargs = self._drop(drop, hidden, kwargs)
                        self.layer_kwargs = kwargs
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        return hook

    def _post_layer(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output):
            if not self.prompt_pass:
                return None
            self.layer = i
            hidden = output if isinstance(output, torch.Tensor) else output[0]
            for step in self.steps:
                if isinstance(step, Rewrite) and step.layer == i:
                    hidden = step.after(hidden, self)
            return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

        return hook

    def _restore(self, module: nn.Module, args: tuple):
        """Before the final norm: ``[B, T', D]`` back to ``[B, T, D]`` (prompt pass only; decode passes carry new tokens)."""
        if not self.prompt_pass or not self.streams:
            return None
        hidden = args[0]
        stream = self.streams[-1]
        full = self._full.scatter(1, stream.index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]), hidden)
        return (full[:, :-1], *args[1:])

    # -- dropping -------------------------------------------------------------------------------------------------------
    def _drop(self, drop: TokenDrop, hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, dict]:
        self.layer = drop.layer - 1  # the stream the layer before ran on
        ctx, old = self.ctx, self.stream()
        b, t = ctx.shape
        with torch.no_grad():
            keep_images = drop.keep(self._scores.pop(id(drop)), self)
        counts = self.image_counts()
        new_counts = drop.keep_counts(counts, ctx.tokens_per_image)
        if len(new_counts) != len(counts) or any(not 0 <= k <= n for k, n in zip(new_counts, counts)):
            raise ConfigError(f"{type(drop).__name__}.keep_counts gave {new_counts} for images of {counts} tokens; each must "
                              f"be between 0 and the image's count.")
        index, real = self.slot_index(), self.slot_real()
        rows, cols = self.image_slots()
        if old is None and ctx.row_lengths is not None:  # the first drop also leaves the padding behind
            real, lengths = real & ctx.valid, list(ctx.row_lengths)
        else:
            lengths = old.lengths if old is not None else [t] * b
        keep = real.index_put((rows, cols), keep_images.bool())
        dropped_per_row = dropped_by(ctx.image_rows, counts, new_counts, b)
        new_lengths = [n - d for n, d in zip(lengths, dropped_per_row)]
        width = max(new_lengths)
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
        new_real = torch.arange(width, device=index.device) < torch.tensor(new_lengths, device=index.device)[:, None]
        new_index = torch.where(new_real, index.gather(1, order), torch.full_like(order, t))
        d = hidden.shape[-1]
        if self._full is None:
            self._full = torch.cat([hidden, hidden.new_zeros(b, 1, d)], dim=1)
        else:
            self._full = self._full.scatter(1, index.unsqueeze(-1).expand(-1, -1, d), hidden)
        hidden = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, d))
        total = [sum(x) for x in zip(dropped_per_row, old.dropped if old is not None else [0] * b)]
        stream = self._stream(drop, new_index, new_real, new_lengths, new_counts, total, kwargs, order, hidden)
        self.streams.append(stream)
        self.layer = drop.layer
        return hidden, self._substitute(stream, kwargs, hidden, drop.layer)

    def _stream(self, drop: TokenDrop, index: torch.Tensor, real: torch.Tensor, lengths: list[int], counts: list[int],
                dropped: list[int], kwargs: dict, order: torch.Tensor, hidden: torch.Tensor) -> Stream:
        ctx = self.ctx
        b, t = ctx.shape
        safe = index.clamp(max=t - 1)
        valid = real & ctx.valid.gather(1, safe)
        image = ctx.image_mask.gather(1, safe) & real
        flat = torch.nonzero_static(image, size=sum(counts))
        old_positions = kwargs["position_ids"]
        old_positions = old_positions.expand(b, -1) if old_positions.shape[0] != b else old_positions
        compact = drop.positions == "compact" or (self.streams and self.streams[-1].compact)
        samples = torch.where(real, ctx.sample_ids.gather(1, safe), torch.full_like(index, -1))
        if compact:
            positions = ranks(valid, samples)
        else:
            positions = torch.where(real, old_positions.gather(1, order), torch.zeros_like(index))
        embeddings = rotary(self.llm, hidden, positions) if compact else gather_rope(kwargs["position_embeddings"], order)
        mask = self._mask(index, valid, samples, hidden.dtype)
        return Stream(drop.layer, index, real, valid, lengths, (flat[:, 0], flat[:, 1]), counts, mask, positions, embeddings,
                      bool(compact), dropped)

    def _mask(self, index: torch.Tensor, valid: torch.Tensor, samples: torch.Tensor, dtype: torch.dtype) -> Any:
        """The prompt pass's mask over the stream: key k is visible from query q when it is a real token of the same
        sample at an earlier-or-equal original position (and within a sliding window, if the model has one). Flash
        attention takes the 2-D key mask instead (its own causality is slot order, which is original order); it cannot
        keep packed samples apart through a mask, so packed rows are refused there."""
        impl = self.llm.model.config._attn_implementation or ""
        if impl.startswith("flash_attention"):
            if self.ctx.segments is not None:
                raise ConfigError("token dropping on packed rows needs the sdpa or eager attention implementation (it keeps "
                                  "the samples apart with a 4-D mask, which flash attention does not take); set "
                                  "attn_implementation: sdpa or data.packing: false.")
            if sliding_window(self.llm) is not None:
                raise ConfigError("token dropping with flash attention on a sliding-window LLM would measure the window in "
                                  "kept slots, not positions; set attn_implementation: sdpa.")
            return valid.long()
        allowed = valid[:, None, :] & (index[:, None, :] <= index[:, :, None]) & (samples[:, None, :] == samples[:, :, None])
        window = sliding_window(self.llm)
        if window is not None:
            allowed &= (index[:, :, None] - index[:, None, :]) < window
        empty = ~allowed.any(dim=-1, keepdim=True)  # a filler's row: let it see itself rather than nothing (no NaN)
        allowed |= empty & torch.eye(index.shape[1], dtype=torch.bool, device=index.device)
        return attention_format(self.llm, allowed.unsqueeze(1), valid, dtype)

    def _substitute(self, stream: Stream, kwargs: dict, hidden: torch.Tensor, layer: int) -> dict:
        """The layer's keyword arguments for the stream: its mask, positions and rotary embeddings."""
        if self.prompt_pass:
            return {**kwargs, "attention_mask": stream.mask, "position_ids": stream.position_ids,
                    "position_embeddings": stream.position_embeddings}
        cache = cache_of(kwargs)
        past, q = cache.get_seq_length(layer), hidden.shape[1]
        b = hidden.shape[0]
        new = torch.ones(b, past - stream.index.shape[1] + q, dtype=torch.bool, device=hidden.device)
        keys = torch.cat([stream.valid, new], dim=1)  # [B, K]
        allowed = keys[:, None, :].expand(b, q, keys.shape[1]).clone()
        if q > 1:  # several new tokens at once: causal among them
            tail = torch.ones(q, q, dtype=torch.bool, device=hidden.device).tril()
            allowed[:, :, -q:] &= tail
        out = {**kwargs, "attention_mask": attention_format(self.llm, allowed.unsqueeze(1), keys, hidden.dtype)}
        if stream.compact:
            positions = kwargs["position_ids"] - torch.tensor(stream.dropped, device=hidden.device)[:, None]
            out.update(position_ids=positions, position_embeddings=rotary(self.llm, hidden, positions))
        return out


def recompute_context() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint``: the recompute of a checkpointed layer runs with the arguments the
    call whose forward it replays bound to its modules (for the recompute only)."""
    call = _ACTIVE.get()
    return contextlib.nullcontext(), (call.bindings() if call is not None else contextlib.nullcontext())


def bind(modules: Sequence[nn.Module], kwargs: dict[str, Any]) -> list[torch.utils.hooks.RemovableHandle]:
    """Keyword arguments added to every forward of ``modules``; returns the hooks' handles (remove them when done)."""
    def hook(module: nn.Module, args: tuple, given: dict):
        return args, {**given, **kwargs}

    return [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]


@contextlib.contextmanager
def bound(modules: Sequence[nn.Module], **kwargs: Any) -> Iterator[None]:
    """:func:`bind` for the duration of a block."""
    handles = bind(modules, kwargs)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
