"""Closed-form FLOPs of a training step — vision encoder, connector, LLM and LM head — for MFU and HFU.

    count = step_flops(model, batch)              # FlopCount: per-part forward / backward / recompute
    count.model_flops, count.hardware_flops       # MFU counts the first, HFU the second
    counter = StepFlops(model)                    # analyse once (what trains, checkpointing, widths) ...
    counter(batch)                                # ... then count each batch from host-side numbers, no device sync

What is counted (the cross-check against ``torch.utils.flop_counter.FlopCounterMode`` is ``tests/test_flops.py``):

* matrix products only, 2 FLOPs per multiply-add: linear layers, convolutions, attention's ``Q·Kᵀ`` and ``P·V``;
* widths and depths from the built modules (GQA's k/v widths, SwiGLU's three matrices, MoE experts, LoRA adapters
  are what the modules hold), so a transform or a custom width needs no table;
* every position of the ``[B, T]`` input through the projections, and attention over the pairs a batch holds
  (:class:`Units`): padded rows over their whole padded length — the kernels compute every masked score, so that is
  what the step costs (the waste is ``perf/padding_waste``; ``useful=True`` counts the samples alone) — packed rows
  over each sample by itself (Σ nᵢ²), as varlen flash attention computes them; causal attention is not halved;
* the LM head on the rows the objective reads (``num_loss_tokens`` for mllm-kit's objectives), else on every position;
* backward: one forward per gradient computed — a product's input gradient when its input needs one, its weight
  gradient when its weight trains. Hence a trained part costs 3× its forward (2× for the backward), a frozen part
  that gradients pass through (a frozen LLM under a trained connector, a frozen LM head) 2×, a frozen part with
  nothing trained before it 1×, and the first layer of a trained connector on a frozen encoder 2×;
* ``recompute``: the forward of each checkpointed block the backward goes through (``trainer.activation_checkpointing``)
  as PyTorch replays it — a transformer block but its final FFN product, which nothing saves (the replay stops at the
  last saved activation) — and the LM head's chunks when more than ``head_chunk`` rows are supervised: hardware FLOPs,
  not model FLOPs;
* a training batch without images runs the vision path on one blank image: counted, as it is computed.

Not counted: non-product work (norms, softmax, activations, routing, interpolation), a fused attention kernel's own
recomputation of its scores in backward, MoE buffer rows beyond ``top_k`` per token (capacity padding), and the
rotary-angle product. A formula per component class lives in :mod:`~mllm_kit.flops.encoders`,
:mod:`~mllm_kit.flops.connectors`, :mod:`~mllm_kit.flops.fusions` and :mod:`~mllm_kit.flops.llm` — FLOP accounting is
one concept, kept in one package with its conventions, beside the registry of formulas; a connector of your own
registers one with :func:`register_connector_flops` (a subclass without one inherits its base class's).
"""

from mllm_kit.flops import fusions  # noqa: F401  registers the fusion formulas
from mllm_kit.flops.connectors import CONNECTOR_FLOPS, Context, Features, Visual, register_connector_flops
from mllm_kit.flops.count import FlopCount, PartFlops, StepFlops, Units, step_flops
from mllm_kit.flops.encoders import ENCODER_FLOPS, register_encoder_flops
from mllm_kit.flops.tally import FlopsUnavailable, Tally

__all__ = ["CONNECTOR_FLOPS", "ENCODER_FLOPS", "Context", "Features", "FlopCount", "FlopsUnavailable", "PartFlops",
           "StepFlops", "Tally", "Units", "Visual", "register_connector_flops", "register_encoder_flops", "step_flops"]
