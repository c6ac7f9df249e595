"""Residual injection into decoder-layer inputs at the image positions (DeepStack, specs/components.md §3.1).

Before decoder layer ℓ runs, ``h[image positions] += S_ℓ`` for each armed layer ℓ. It works on any
transformers decoder through forward pre-hooks — no subclassing, no copy of the decoder loop. The hooks stay
registered and read the armed tensors, so activation checkpointing (which re-runs the layers during the
backward pass) re-applies the same additions. ``once`` disarms each layer after it fires: generation injects
in the prefill pass only, and decode steps run on the KV cache untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from mllm_kit.errors import ConfigError


class ResidualInjector:
    """Adds ``[n_img, N, D]`` tensors to the inputs of chosen decoder layers at the image-token positions."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self.once = False
        self._values: dict[int, torch.Tensor] = {}
        self._index: tuple[torch.Tensor, torch.Tensor] | None = None
        self._hooked: set[int] = set()

    def arm(self, values: dict[int, torch.Tensor], image_mask: torch.Tensor, num_positions: int) -> None:
        """``values``: layer index → ``[n_img, N, D]``; ``image_mask`` ``[B, T]`` marks the n_img·N image positions
        (row-major, in the order ``masked_scatter`` fills them). ``num_positions`` is their host-side count."""
        depth = len(self.layers)
        for layer in values:
            if not 0 <= layer < depth:
                raise ConfigError(f"injection into LLM layer {layer}, but the LLM has {depth} decoder layers (0..{depth - 1}); "
                                  f"lower the connector's start/interval/num_crops.")
            if layer not in self._hooked:
                self.layers[layer].register_forward_pre_hook(self._hook_for(layer), with_kwargs=True)
                self._hooked.add(layer)
        # nonzero_static sizes its output from the host count, so locating the positions costs no device sync.
        flat = torch.nonzero_static(image_mask, size=num_positions)
        self._index = (flat[:, 0], flat[:, 1])
        self._values = {layer: v.reshape(-1, v.shape[-1]) for layer, v in values.items()}

    def clear(self) -> None:
        self._values, self._index, self.once = {}, None, False

    @property
    def armed(self) -> list[int]:
        return sorted(self._values)

    def _hook_for(self, layer: int):
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
