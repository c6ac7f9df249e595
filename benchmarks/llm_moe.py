"""Upcycled LLM FFN cost (MoE-LLaVA, specs/components.md §6.1): routed top-k against all experts densely and
against the dense FFN it came from.

Forward + backward of one Llama-style FFN (gate/up/down) upcycled to E experts, on T tokens, in training
mode (capacity factor 1.5). "All experts" runs the same stacked experts on every token and mixes them with
the router probabilities (what an implementation without dispatch costs). Targets: top-2 of 4 ≤ 0.65× all
experts and ≤ 2.2× the dense FFN.

    python benchmarks/llm_moe.py [--device cuda --dtype bfloat16] [--tokens 4096 --hidden 1024 --ffn 2816]
"""

from __future__ import annotations


import torch
from timing import median_ms_each, timing_parser
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from mllm_kit.llm.moe import SparseMoE


def main() -> None:
    parser = timing_parser(__doc__, steps=10, warmup=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    dense = LlamaMLP(LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn)).to(args.device, dtype)
    moe = SparseMoE(dense, num_experts=args.experts, top_k=args.top_k, capacity_factor=1.5).to(args.device, dtype).train()
    x = torch.randn(1, args.tokens, args.hidden, device=args.device, dtype=dtype, requires_grad=True)

    def routed() -> None:
        moe(x).sum().backward()

    def all_experts() -> None:
        tokens = x.reshape(-1, args.hidden)
        probs = moe.router(tokens).float().softmax(-1)
        every = moe.experts(tokens.unsqueeze(0).expand(args.experts, -1, -1))  # [E, T, D]
        (every * probs.t().unsqueeze(-1)).sum(0).sum().backward()

    def dense_ffn() -> None:
        dense(x).sum().backward()

    times = median_ms_each({"routed": routed, "all": all_experts, "dense": dense_ffn}, args.steps, args.warmup, args.device)
    t_routed, t_all, t_dense = times["routed"], times["all"], times["dense"]
    print(f"{args.tokens} tokens, D={args.hidden}, FFN {args.ffn}, top-{args.top_k} of {args.experts}, capacity 1.5 ({args.device}, {args.dtype}): "
          f"routed {t_routed:.1f} ms, all experts {t_all:.1f} ms, dense FFN {t_dense:.1f} ms; "
          f"routed/all {t_routed / t_all:.3f}, routed/dense {t_routed / t_dense:.3f}; dropped {moe.metrics['moe_dropped'].item():.3f}")


if __name__ == "__main__":
    main()
