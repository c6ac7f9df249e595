"""The language-model contract (DESIGN.md, "Core interfaces")."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mllm_kit.context import ForwardContext
from mllm_kit.errors import ConfigError
from mllm_kit.llm.decoding import DecodeCall
from mllm_kit.llm.steps import LayerStep, TokenDrop


class LanguageModel(nn.Module):
    """Wraps a causal LM and its tokenizer.

    LLM-side features attach to ``model`` without subclassing any architecture: stage transforms replace modules
    (MoE upcycling, LoRA, LoRA-MoE), and per-call work inside the decoder (DeepStack injections, SVA re-aggregation,
    gates, token dropping) arrives as layer steps that :meth:`decode` installs for that call only.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    image_token: str
    image_token_id: int
    hidden_size: int
    decoder_layers: nn.ModuleList
    layer_cls: type[nn.Module]

    def save_pretrained(self, directory: Path, weights: bool = True) -> dict[str, Any]:
        """Write model (or, with ``weights=False``, only its config) + tokenizer to ``directory``; return the spec
        fields that make it load from there."""
        if weights:
            self.model.save_pretrained(directory)
        else:
            self.model.config.save_pretrained(directory)
            if self.model.generation_config is not None:
                self.model.generation_config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return {"path": str(directory), "config": None, "tokenizer": None, "load_weights": weights}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` ids → ``[B, T, D]`` input embeddings."""
        return self.model.get_input_embeddings()(input_ids)

    def decode(self, inputs_embeds: torch.Tensor, ctx: ForwardContext | None = None, steps: Sequence[LayerStep] = (),
               output_hidden_states: bool = False):
        """The decoder without its LM head, with ``steps`` installed for this call: ``[B, T, D]`` embeddings →
        ``BaseModelOutput`` whose ``last_hidden_state`` ``[B, T, D]`` is after the final norm; :meth:`head` turns it
        into logits. Mask and positions come from ``ctx``. Packed rows (``attention_mask`` None, ``position_ids``
        restarting per sample) are isolated by transformers only without a cache, hence ``use_cache`` False."""
        mask, positions = (ctx.attention_mask, ctx.position_ids) if ctx is not None else (None, None)
        if output_hidden_states and any(isinstance(s, TokenDrop) for s in steps):
            raise ConfigError("output_hidden_states with token dropping is not supported: the layers after the drop hold "
                              "fewer positions than the sequence.")
        with self.stepping(ctx, steps):
            return self.model.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions,
                                            use_cache=False, output_hidden_states=output_hidden_states)

    def stepping(self, ctx: ForwardContext | None, steps: Sequence[LayerStep]) -> DecodeCall:
        """A context manager: ``steps`` installed as hooks on this LLM's modules for the block (a forward, or a whole
        ``generate``), removed when it ends (:class:`~mllm_kit.llm.decoding.DecodeCall`)."""
        if steps and ctx is None:
            raise ConfigError("layer steps need the call's ForwardContext (MLLM.embed_inputs builds it).")
        return DecodeCall(self, ctx, steps)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` → ``[..., V]``: the LM head, with the final logit soft-capping of models that have one (Gemma-2)."""
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    @property
    def vocab_size(self) -> int:
        """Width of the LM head's output (may exceed ``len(tokenizer)`` when the embedding matrix is padded)."""
        return self.model.get_output_embeddings().weight.shape[0]

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        """Runs the HF model on embeddings; returns its ``CausalLMOutputWithPast`` (``logits [B, T, V]``)."""
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
