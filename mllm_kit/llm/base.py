"""The language-model contract (DESIGN.md, "Core interfaces")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mllm_kit.llm.inject import ResidualInjector


class LanguageModel(nn.Module):
    """Wraps a causal LM and its tokenizer.

    LLM-side features (DeepStack injection, MoE upcycling, LoRA) attach to ``model`` through module
    replacement and forward hooks on ``decoder_layers``, so no architecture needs subclassing.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    image_token: str
    image_token_id: int
    hidden_size: int
    decoder_layers: nn.ModuleList
    layer_cls: type[nn.Module]

    @property
    def injector(self) -> ResidualInjector:
        """Residual additions to decoder-layer inputs at the image positions (DeepStack)."""
        injector = self.__dict__.get("_injector")
        if injector is None:
            injector = self.__dict__["_injector"] = ResidualInjector(self.decoder_layers)
        return injector

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

    def decode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, output_hidden_states: bool = False):
        """The decoder without its LM head: ``[B, T, D]`` embeddings → ``BaseModelOutput`` whose ``last_hidden_state``
        ``[B, T, D]`` is after the final norm; :meth:`head` turns it into logits. Packed rows (``attention_mask`` None,
        ``position_ids`` restarting per sample) are isolated by transformers only without a cache, hence ``use_cache``
        False."""
        return self.model.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                        use_cache=False, output_hidden_states=output_hidden_states)

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
