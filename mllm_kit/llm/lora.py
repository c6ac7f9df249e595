"""LoRA through peft: ``add_lora`` and ``merge_lora`` transforms (Hu et al., 2022; LLaVA-1.5's LoRA variant,
specs/components.md §1.3: r = 128, α = 256).

``add_lora`` wraps the chosen ``nn.Linear`` layers with peft's LoRA layers in place (``inject_adapter_in_model``),
on the LLM, the encoder or both: y = W₀x + (α/r)·B(A(dropout(x))), A Kaiming-uniform, B = 0, so right after the
transform the model computes exactly what it computed before. The stage's ``trainable`` then names what trains,
e.g. ``['re:lora_']`` for the adapters alone, or ``['re:lora_', connector]``.

``merge_lora`` folds every adapter into its base weight (W₀ + (α/r)·BA) and puts the plain ``nn.Linear`` back,
so the saved model is an ordinary one again.

Targets: ``target_modules`` is a regular expression over module paths in the MLLM (``re.fullmatch``, e.g.
``llm\\..*\\.(q_proj|v_proj)`` or ``encoder\\..*\\.fc1``), or a list of module names (``[q_proj, v_proj]``) looked
for inside the parts listed in ``on`` (default: the LLM).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from mllm_kit.errors import ConfigError, did_you_mean
from mllm_kit.registry import register_transform

PARTS = ("encoder", "connector", "llm")


def select_linears(model: nn.Module, target_modules: str | Sequence[str], on: Sequence[str], what: str) -> list[str]:
    """Paths of the ``nn.Linear`` modules of ``model`` (an MLLM) that ``target_modules`` names (see the module docstring)."""
    bad = [p for p in on if p not in PARTS]
    if bad:
        raise ConfigError(f"{what}: on={list(on)} names no model part; choose from {list(PARTS)}.")
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if isinstance(target_modules, str):
        regex = re.compile(target_modules)
        chosen = [name for name in linears if regex.fullmatch(name)]
    else:
        names = set(target_modules)
        chosen = [name for name in linears if name.split(".")[0] in on and name.rsplit(".", 1)[-1] in names]
    if not chosen:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linears if name.split(".")[0] in on})
        hint = did_you_mean(str(target_modules), leaves) if not isinstance(target_modules, str) else ""
        raise ConfigError(f"{what}: target_modules={target_modules!r} matches no Linear layer in {list(on)}.{hint} "
                          f"Linear names there: {leaves}; a regex matches whole paths such as {linears[-1]!r}.")
    return chosen


@register_transform("add_lora")
class AddLoRA:
    """Inject peft LoRA adapters (``r``, ``alpha``, ``dropout``) into the chosen Linear layers."""

    def __init__(self, target_modules: str | list[str] = ("q_proj", "k_proj", "v_proj", "o_proj"), r: int = 8, alpha: float = 16,
                 dropout: float = 0.05, on: list[str] = ("llm",), adapter_name: str = "default") -> None:
        if r < 1:
            raise ConfigError(f"add_lora r must be ≥ 1, got {r}.")
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.r, self.alpha, self.dropout, self.on, self.adapter_name = r, alpha, dropout, list(on), adapter_name

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "add_lora", "target_modules": self.target_modules, "r": self.r, "alpha": self.alpha,
                "dropout": self.dropout, "on": self.on, "adapter_name": self.adapter_name}

    def __call__(self, model) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        targets = select_linears(model, self.target_modules, self.on, "add_lora")
        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets, bias="none")
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        inject_adapter_in_model(config, model, adapter_name=self.adapter_name)
        for path in targets:  # new modules start in training mode; keep the mode the model is in (eval: no dropout)
            model.get_submodule(path).train(model.training)
        for name, param in model.named_parameters():  # peft freezes everything else; the stage's `trainable` decides that
            if name in trainable or name.replace(".base_layer", "") in trainable:
                param.requires_grad_(True)
        model.record_transform(self.spec)


@register_transform("merge_lora")
class MergeLoRA:
    """Fold every LoRA adapter into its base Linear and restore the plain layer (peft ``merge_and_unload``)."""

    def __call__(self, model) -> None:
        from peft.tuners.lora import LoraLayer

        merged = 0
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge(safe_merge=True)
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, module.get_base_layer())
                merged += 1
        if not merged:
            raise ConfigError("merge_lora: the model has no LoRA adapters (add_lora adds them).")
        model.transforms[:] = [t for t in model.transforms if t.get("name") != "add_lora"]
        model.record_transform(None)
