"""LoRA-MoE: a frozen Linear plus a mixture of LoRA experts (Octavius, Chen et al., ICLR 2024; specs/components.md §6.2,
with Awaker2.5-VL's always-on shared expert and gate temperature/noise, §6.4).

Each wrapped Linear computes

    y = W₀x + Σ_e g_e · (α/r) · B_e A_e dropout(x)          A_e ∈ ℝ^{d_in×r}, B_e ∈ ℝ^{r×d_out}

with A stored as ``[E, d_in, r]`` and initialised Kaiming-uniform (a = √5) on that tensor as Octavius does, and
B = 0, so right after ``add_lora_moe`` the model computes what it computed before. Every expert's product is
computed for every token with two batched matmuls (rank E·r, small beside W₀) and mixed by the gate — no
gather, no host sync.

Gates (``gate``):

* ``instance`` (Octavius): one gate per sample, computed once from the LLM's input embeddings of its
  instruction — the first user message's text tokens by themselves (no template, no image; the dataset supplies
  them as ``instruction_ids``), else the prompt before the first answer — and shared by every
  wrapped layer: logits = mean_t(x_t)·W_g / τ (+ Gaussian noise ε in training), W_g ∈ ℝ^{D×E} ~ N(0, 1) (no bias);
  softmax; the top-k renormalised (g_i / (Σ_topk g + 1e-9)). Octavius averages over pad tokens too; here they
  are left out.
* ``token``: each wrapped Linear routes each token of its own input with a router Linear(d_in→E, no bias).

``second_policy`` (top-2, as Octavius's gating): ``all`` keeps the second expert — what the released code
computes, since it builds the ``random`` mask but never applies it; ``random`` keeps it with probability
min(1, g₂ / ``second_threshold``) in training, as GShard and the paper describe; ``none`` drops it.
``shared_expert: true`` adds Awaker's always-on expert with gate 1. No load-balancing loss (Octavius trains
with the LM loss alone); the mean gate per expert is logged as ``llm_lora_moe_load_e<i>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from mllm_kit.context import ForwardContext
from mllm_kit.errors import ConfigError
from mllm_kit.llm.lora import select_linears
from mllm_kit.llm.steps import Bind, LayerStep
from mllm_kit.registry import register_transform

SECOND_POLICIES = ("all", "random", "none")


def top_k_gate(logits: torch.Tensor, top_k: int, second_policy: str = "all", threshold: float = 0.2,
               training: bool = False) -> torch.Tensor:
    """``logits [..., E]`` → sparse gates ``[..., E]``: softmax, the top-k renormalised by their sum (+1e-9);
    for k ≥ 2 ``second_policy`` decides whether the second choice stays (see the module docstring)."""
    probs = logits.float().softmax(dim=-1)
    values, index = probs.topk(top_k, dim=-1)
    values = values / (values.sum(dim=-1, keepdim=True) + 1e-9)
    if top_k > 1 and second_policy != "all":
        keep = torch.zeros_like(values[..., 1])
        if second_policy == "random":
            keep = (torch.rand_like(keep) < values[..., 1] / threshold).float() if training else torch.ones_like(keep)
        values = torch.cat([values[..., :1], (values[..., 1] * keep).unsqueeze(-1), values[..., 2:]], dim=-1)
    return torch.zeros_like(probs).scatter(-1, index, values)


class InstructionGate(nn.Module):
    """Octavius's instance-level gate, shared by all LoRA-MoE layers: per call, :meth:`layer_steps` computes each
    sample's gates from its instruction and binds them to the layers' forwards (:class:`~mllm_kit.llm.steps.Bind`)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, second_policy: str, second_threshold: float,
                 temperature: float, noise: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden_size, num_experts))
        self.top_k, self.second_policy, self.second_threshold = top_k, second_policy, second_threshold
        self.temperature, self.noise = temperature, noise
        self.layers: list[nn.Module] = []  # the LoRA-MoE layers it gates (a plain list: not submodules)

    def layer_steps(self, ctx: ForwardContext) -> list[LayerStep]:
        """The call's gates bound to every gated layer; ``ctx.instruction``: each sample's instruction embeddings
        ``[S, L, D]`` and mask ``[S, L]``; packed rows (``ctx.segments``) give each position its sample's gate."""
        if ctx.instruction is None:
            raise ConfigError("the LoRA-MoE instance gate reads each sample's instruction, but the call has none; run the "
                              "model through MLLM (forward / generate), which embeds it.")
        # Through the module call: ZeRO-3 gathers the weight in the forward hooks and hooks the returned tensor to
        # gather it again in backward.
        per_sample = self(*ctx.instruction)  # [S, E]
        gates = per_sample.unsqueeze(1) if ctx.segments is None else per_sample[ctx.segments]
        return [Bind(modules=self.layers, kwargs={"gates": gates}, metrics={"lora_moe_load": per_sample.detach().mean(dim=0)})]

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``embeds [S, L, D]`` token embeddings, ``mask [S, L]`` the instruction tokens, one row per sample → the gates
        ``[S, E]``."""
        m = mask.to(embeds.dtype).unsqueeze(-1)
        pooled = (embeds * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # mean over the instruction tokens
        logits = pooled.float() @ self.weight.float() / self.temperature  # = mean of per-token logits (linear)
        if self.training and self.noise > 0:
            logits = logits + self.noise * torch.randn_like(logits)
        return top_k_gate(logits, self.top_k, self.second_policy, self.second_threshold, self.training)


class LoRAMoELinear(nn.Module):
    """``base`` (frozen by the stage, not here) plus E LoRA experts (+ an optional shared one); ``[..., d_in] → [..., d_out]``.
    With the instance gate its forward takes the call's ``gates`` (bound by :meth:`InstructionGate.layer_steps`); with a
    token router it reports its expert usage through ``report`` (bound by :class:`~mllm_kit.MLLM` for each forward)."""

    reports_aux = True

    def __init__(self, base: nn.Linear, num_experts: int, r: int, alpha: float, dropout: float, shared_expert: bool,
                 gate: InstructionGate | None, top_k: int, second_policy: str, second_threshold: float) -> None:
        super().__init__()
        self.base_layer = base
        n = num_experts + int(shared_expert)
        self.num_experts, self.shared_expert, self.scaling = num_experts, shared_expert, alpha / r
        self.lora_A = nn.Parameter(torch.empty(n, base.in_features, r, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(n, r, base.out_features, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # on [E, d_in, r], as Octavius: bound 1/√(d_in·r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = None if gate is not None else nn.Linear(base.in_features, num_experts, bias=False,
                                                              device=base.weight.device, dtype=base.weight.dtype)
        self.top_k, self.second_policy, self.second_threshold = top_k, second_policy, second_threshold

    def forward(self, x: torch.Tensor, gates: torch.Tensor | None = None, report: Callable | None = None) -> torch.Tensor:
        """``gates``: ``[B, 1, E]`` (packed rows ``[B, T, E]``) from the instance gate; ignored with a token router."""
        if self.router is not None:  # token-level gate [..., E]; each layer reports its own expert usage
            gates = top_k_gate(self.router(x), self.top_k, self.second_policy, self.second_threshold, self.training)
            if report is not None:
                report(metrics={"lora_moe_load": gates.detach().reshape(-1, self.num_experts).mean(dim=0)})
        elif gates is None:
            raise ConfigError("LoRA-MoE layer ran without its instance gate's gates; run the model through MLLM "
                              "(forward / generate), which computes them from the instruction for each call.")
        if self.shared_expert:
            gates = torch.cat([gates, gates.new_ones(*gates.shape[:-1], 1)], dim=-1)
        a, b = self.lora_A, self.lora_B
        h = self.dropout(x).to(a.dtype) @ a.transpose(0, 1).reshape(a.shape[1], -1)  # [..., E·r]
        h = (h.unflatten(-1, (a.shape[0], a.shape[2])) * gates.to(h.dtype).unsqueeze(-1)).flatten(-2)
        return self.base_layer(x) + (self.scaling * (h @ b.reshape(-1, b.shape[-1]))).to(x.dtype)


@register_transform("add_lora_moe")
class AddLoRAMoE:
    """Wrap the chosen Linear layers (Octavius: q/k/v/o of every LLM layer) with :class:`LoRAMoELinear`."""

    def __init__(self, target_modules: str | list[str] = ("q_proj", "k_proj", "v_proj", "o_proj"), on: list[str] = ("llm",),
                 num_experts: int = 4, top_k: int = 2, r: int = 32, alpha: float = 32, dropout: float = 0.1,
                 gate: Literal["instance", "token"] = "instance", second_policy: Literal["all", "random", "none"] = "all",
                 second_threshold: float = 0.2, shared_expert: bool = False, temperature: float = 1.0, noise: float = 0.0) -> None:
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"add_lora_moe needs 1 ≤ top_k ≤ num_experts, got top_k={top_k}, num_experts={num_experts}.")
        if gate not in ("instance", "token"):
            raise ConfigError(f"add_lora_moe gate must be 'instance' or 'token', got {gate!r}.")
        if second_policy not in SECOND_POLICIES:
            raise ConfigError(f"add_lora_moe second_policy must be one of {SECOND_POLICIES}, got {second_policy!r}.")
        if r < 1 or temperature <= 0:
            raise ConfigError(f"add_lora_moe needs r ≥ 1 and temperature > 0, got r={r}, temperature={temperature}.")
        self.target_modules = target_modules if isinstance(target_modules, str) else list(target_modules)
        self.options: dict[str, Any] = dict(on=list(on), num_experts=num_experts, top_k=top_k, r=r, alpha=alpha, dropout=dropout,
                                            gate=gate, second_policy=second_policy, second_threshold=second_threshold,
                                            shared_expert=shared_expert, temperature=temperature, noise=noise)

    def __call__(self, model) -> None:
        o = self.options
        targets = select_linears(model, self.target_modules, o["on"], "add_lora_moe")
        gate = None
        if o["gate"] == "instance":
            if hasattr(model.llm, "lora_moe_gate"):
                raise ConfigError("add_lora_moe: the model already has an instance-level LoRA-MoE gate; apply the transform once.")
            embedding = model.llm.model.get_input_embeddings().weight
            gate = InstructionGate(model.llm.hidden_size, o["num_experts"], o["top_k"], o["second_policy"],
                                   o["second_threshold"], o["temperature"], o["noise"]).to(embedding.device, embedding.dtype)
            model.llm.lora_moe_gate = gate.train(model.llm.training)
        for path in targets:
            parent, _, leaf = path.rpartition(".")
            base = model.get_submodule(path)
            layer = LoRAMoELinear(base, o["num_experts"], o["r"], o["alpha"], o["dropout"], o["shared_expert"], gate, o["top_k"],
                                  o["second_policy"], o["second_threshold"]).train(base.training)
            setattr(model.get_submodule(parent), leaf, layer)
            if gate is not None:
                gate.layers.append(layer)
        model.record_transform({"name": "add_lora_moe", "target_modules": self.target_modules, **o})
