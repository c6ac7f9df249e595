"""MoE connector cost: top-k routed dispatch vs evaluating every expert on every token.

Forward + backward of CuMo's MLP-MoE connector (4 experts, top-2) against the same experts run densely on
all tokens (what a naive implementation costs), and with ``static_capacity`` (buffers sized from shapes: no host
sync, but every expert gets T rows). Target: top-2 of 4 ≤ 0.65× the dense cost.

    python benchmarks/moe_connector.py [--device cuda] [--tokens 2304 --in-dim 512 --out-dim 1024]
"""

from __future__ import annotations


import torch
from timing import median_ms_each, timing_parser

from mllm_kit.connectors.moe import MoEMLPConnector
from mllm_kit.encoders.base import VisualFeatures


def main() -> None:
    parser = timing_parser(__doc__, steps=20, warmup=3)
    parser.add_argument("--tokens", type=int, default=2304, help="tokens per batch (e.g. 4 images × 576)")
    parser.add_argument("--in-dim", type=int, default=512)
    parser.add_argument("--out-dim", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    moe = MoEMLPConnector([args.in_dim], args.out_dim, num_experts=args.experts, top_k=args.top_k).to(args.device)
    static = MoEMLPConnector([args.in_dim], args.out_dim, num_experts=args.experts, top_k=args.top_k, static_capacity=True).to(args.device)
    static.load_state_dict(moe.state_dict())
    x = torch.randn(1, args.tokens, args.in_dim, device=args.device)
    features = [VisualFeatures(hidden_states=(x,), grid=(1, args.tokens), selected_layer=0)]

    def routed() -> None:
        moe(features).tokens.sum().backward()

    def routed_static() -> None:
        static(features).tokens.sum().backward()

    def dense() -> None:
        tokens = x.reshape(-1, args.in_dim)
        probs = moe.router(tokens).float().softmax(-1)
        every = moe.experts(tokens.unsqueeze(0).expand(args.experts, -1, -1))  # [E, T, D]
        (every * probs.t().unsqueeze(-1)).sum(0).sum().backward()

    times = median_ms_each({"routed": routed, "static": routed_static, "dense": dense}, args.steps, args.warmup, args.device)
    t_routed, t_static, t_dense = times["routed"], times["static"], times["dense"]
    print(f"{args.tokens} tokens, {args.in_dim}→{args.out_dim}, top-{args.top_k} of {args.experts} ({args.device}): "
          f"routed {t_routed:.1f} ms ({t_routed / t_dense:.3f}×), static capacity {t_static:.1f} ms ({t_static / t_dense:.3f}×), "
          f"all experts {t_dense:.1f} ms")


if __name__ == "__main__":
    main()
