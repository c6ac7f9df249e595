"""Writes into decoder layers at the image positions: DeepStack's residual additions (specs/components.md §3.1) and
Cambrian's re-aggregation (§5.4).

* an **injection** at layer ℓ: before layer ℓ runs, ``h[image positions] += S_ℓ``;
* a **rewrite** at layer ℓ: after layer ℓ runs, ``h[image positions] = f_ℓ(h[image positions])`` — Cambrian's SVA
  re-attends its member windows with the LLM's hidden states as queries (``cambrian_llama.py``: after
  ``decoder_layer(...)`` of each listed layer).

Both work on any transformers decoder through forward (pre-)hooks — no subclassing, no copy of the decoder loop.
The hooks stay registered and read what is armed, so activation checkpointing (which re-runs the layers during the
backward pass) re-applies the same writes. ``once`` disarms each layer after it fires: generation writes in the
prefill pass only, and decode steps run on the KV cache untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mllm_kit.errors import ConfigError

Rewrite = Callable[[torch.Tensor], torch.Tensor]  # [n_img·N, D] hidden states at the image positions → replacement


class ResidualInjector:
    """Adds ``[n_img, N, D]`` tensors to the inputs of chosen decoder layers, and rewrites the outputs of others, at the
    image-token positions."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self.once = False
        self._values: dict[int, torch.Tensor] = {}
        self._rewrites: dict[int, Rewrite] = {}
        self._index: tuple[torch.Tensor, torch.Tensor] | None = None
        self._hooked: set[tuple[str, int]] = set()

    def arm(self, values: dict[int, torch.Tensor] | None, image_mask: torch.Tensor, num_positions: int,
            rewrites: dict[int, Rewrite] | None = None) -> None:
        """``values``: layer index → ``[n_img, N, D]`` added before that layer; ``rewrites``: layer index → a function
        of the ``[n_img·N, D]`` hidden states at the image positions after that layer, returning their replacement.
        ``image_mask`` ``[B, T]`` marks the n_img·N image positions (row-major, in the order ``masked_scatter`` fills
        them). ``num_positions`` is their host-side count."""
        values, rewrites = values or {}, rewrites or {}
        depth = len(self.layers)
        for layer in [*values, *rewrites]:
            if not 0 <= layer < depth:
                raise ConfigError(f"the connector writes into LLM layer {layer}, but the LLM has {depth} decoder layers "
                                  f"(0..{depth - 1}); lower the connector's start/interval/num_crops or llm_layers.")
        for layer in values:
            self._hook(layer, "pre")
        for layer in rewrites:
            self._hook(layer, "post")
        # nonzero_static sizes its output from the host count, so locating the positions costs no device sync.
        flat = torch.nonzero_static(image_mask, size=num_positions)
        self._index = (flat[:, 0], flat[:, 1])
        self._values = {layer: v.reshape(-1, v.shape[-1]) for layer, v in values.items()}
        self._rewrites = dict(rewrites)

    def clear(self) -> None:
        self._values, self._rewrites, self._index, self.once = {}, {}, None, False

    @property
    def armed(self) -> list[int]:
        return sorted({*self._values, *self._rewrites})

    def _hook(self, layer: int, when: str) -> None:
        if (when, layer) in self._hooked:
            return
        if when == "pre":
            self.layers[layer].register_forward_pre_hook(self._pre_hook(layer), with_kwargs=True)
        else:
            self.layers[layer].register_forward_hook(self._post_hook(layer))
        self._hooked.add((when, layer))

    def _pre_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            value = self._values.get(layer)
            if value is None:
                return None
            if self.once:
                del self._values[layer]
            if args:
                hidden = args[0]
                return (hidden.index_put(self._index, value.to(hidden.dtype), accumulate=True), *args[1:]), kwargs
            hidden = kwargs["hidden_states"]
            return args, {**kwargs, "hidden_states": hidden.index_put(self._index, value.to(hidden.dtype), accumulate=True)}

        return hook

    def _post_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output):
            rewrite = self._rewrites.get(layer)
            if rewrite is None:
                return None
            if self.once:
                del self._rewrites[layer]
            hidden = output if isinstance(output, torch.Tensor) else output[0]  # transformers 4.x layers return tuples
            new = rewrite(hidden[self._index]).to(hidden.dtype)
            hidden = hidden.index_put(self._index, new)
            return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

        return hook
