"""Any transformers causal LM as the language backbone (Llama, Qwen2, Mistral, Phi-3, ...)."""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from mllm_kit.encoders.base import find_layer_list
from mllm_kit.errors import ConfigError
from mllm_kit.pretrained import from_pretrained, resolve_dtype
from mllm_kit.llm.base import LanguageModel
from mllm_kit.log import get_logger
from mllm_kit.registry import register_llm

log = get_logger(__name__)


@register_llm("hf_causal_lm")
class HFCausalLM(LanguageModel):
    """A ``transformers`` causal LM loaded from ``path`` (a local dir or hub id) or built from ``config``.

    ``config`` is a dict with ``model_type`` (e.g. ``{"model_type": "llama", "hidden_size": 64, ...}``) and
    needs ``tokenizer`` (a directory; in a recipe ``${tiny_tokenizer:}`` is the offline tokenizer of :mod:`mllm_kit.tiny`); the
    vocabulary size and special-token ids default to the tokenizer's. The image token (``<image>``) and any ``special_tokens`` a chat template needs are
    added to the tokenizer when absent and the embeddings resized. Tokenizers without a pad token use
    ``unk`` or, failing that, ``eos`` — labels never derive from pad ids, so that is safe. ``family``
    (``llama``, ``qwen2``, ...) names the architecture without loading it; ``--smoke`` uses it.
    ``load_weights: false`` builds the architecture from ``path``'s config without its weights.
    """

    def __init__(
        self,
        path: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        dtype: str = "float32",
        attn_implementation: str | None = "sdpa",
        image_token: str = "<image>",
        special_tokens: list[str] | tuple[str, ...] = (),
        trust_remote_code: bool = False,
        family: str | None = None,
        load_weights: bool = True,
    ) -> None:
        super().__init__()
        self.family = family
        if (path is None) == (config is None):
            raise ConfigError("hf_causal_lm: give exactly one of 'path' (a model directory) or 'config'.")
        tokenizer_path = tokenizer or path
        if tokenizer_path is None:
            raise ConfigError("hf_causal_lm built from 'config' needs 'tokenizer' (a tokenizer directory).")
        self.tokenizer = from_pretrained(AutoTokenizer, tokenizer_path, what="tokenizer", trust_remote_code=trust_remote_code)
        kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if path is not None and load_weights:
            self.model = from_pretrained(AutoModelForCausalLM, path, what="llm", **kwargs)
        elif path is not None:  # the architecture only; the caller loads the weights (a transformed saved model)
            hf_config = from_pretrained(AutoConfig, path, what="llm config", trust_remote_code=trust_remote_code)
            self.model = AutoModelForCausalLM.from_config(hf_config, **kwargs)
        else:
            cfg = dict(config)
            model_type = cfg.pop("model_type", None)
            if model_type is None:
                raise ConfigError("hf_causal_lm config needs 'model_type' (e.g. llama, qwen2, mistral, phi3).")
            tok = self.tokenizer
            ids = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                   "pad_token_id": tok.pad_token_id}
            hf_config = AutoConfig.for_model(model_type, **{**{k: v for k, v in ids.items() if v is not None}, **cfg})
            self.model = AutoModelForCausalLM.from_config(hf_config, **kwargs)
        self.image_token = image_token
        self._ensure_tokens([image_token, *special_tokens])
        self._ensure_pad_token()
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        cfg = self.model.config
        self.hidden_size = cfg.get_text_config().hidden_size
        self.decoder_layers = find_layer_list(self.model, cfg.get_text_config().num_hidden_layers)
        self.layer_cls = type(self.decoder_layers[0])

    def _ensure_tokens(self, tokens: list[str]) -> None:
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in dict.fromkeys(tokens) if t not in vocab]
        if not missing:
            return
        self.tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
        if len(self.tokenizer) > self.model.get_input_embeddings().num_embeddings:
            self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        log.info("added tokens %s to the tokenizer (vocab now %d)", missing, len(self.tokenizer))

    def _ensure_pad_token(self) -> None:
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
        if tok.pad_token is None:
            raise ConfigError("the tokenizer has no pad, unk or eos token; set one in its tokenizer_config.json.")
        self.model.config.pad_token_id = tok.pad_token_id
        if self.model.generation_config is not None:
            self.model.generation_config.pad_token_id = tok.pad_token_id
