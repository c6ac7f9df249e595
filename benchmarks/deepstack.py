"""DeepStack-L training-step cost against the same model without stacks (same LLM input length).

Both variants share one encoder, projector and LLM; DeepStack additionally encodes 4 crops per image and
adds 4 stacks at LLM layers 1–4 (specs/components.md §3.1). The default sizes keep CLIP-L/336 : Vicuna-7B
proportions at CPU scale (encoder ≈ 1/20 of the LLM, 64 visual tokens of a ~160-token sequence).
A step is forward, next-token loss, backward and AdamW on projector + LLM (frozen encoder, LLaVA's SFT stage).
Target: DeepStack ≤ 1.10× the plain step.

    python benchmarks/deepstack.py [--device cuda] [--llm-hidden 768 --llm-layers 8 --batch 4]
"""

from __future__ import annotations


import torch
from timing import median_ms_each, timing_parser

from mllm_kit import MLLM
from mllm_kit.batch import IGNORE_INDEX, Batch
from mllm_kit.objectives.lm import LMObjective
from mllm_kit.config import resolve_model
from mllm_kit.tiny import tiny_tokenizer


def main() -> None:
    parser = timing_parser(__doc__, steps=10, warmup=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=96)
    parser.add_argument("--llm-hidden", type=int, default=768)
    parser.add_argument("--llm-layers", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    encoder = {"name": "hf_clip", "config": {"image_size": 128, "patch_size": 16, "hidden_size": 256, "intermediate_size": 1024,
                                             "num_hidden_layers": 4, "num_attention_heads": 4}}
    llm = {"name": "hf_causal_lm", "tokenizer": str(tiny_tokenizer()),
           "config": {"model_type": "llama", "hidden_size": args.llm_hidden, "intermediate_size": 8 * args.llm_hidden // 3,
                      "num_hidden_layers": args.llm_layers, "num_attention_heads": args.llm_hidden // 64,
                      "num_key_value_heads": args.llm_hidden // 64}}
    deepstack = MLLM.build(resolve_model(encoder, "deepstack", llm)).to(args.device)
    plain = MLLM(deepstack.encoder, deepstack.connector.inner, deepstack.llm)  # the same modules, no stacks
    n = deepstack.tokens_per_image()
    ids = torch.randint(10, 300, (args.batch, n + args.text_tokens))
    ids[:, 1 : 1 + n] = deepstack.image_token_id
    labels = ids.clone()
    labels[:, : 1 + n + args.text_tokens // 2] = IGNORE_INDEX
    common = dict(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(args.batch, 3, 128, 128),
                  images_per_sample=[1] * args.batch, num_image_tokens=args.batch * n)
    batches = {
        "plain": Batch(**common).to(args.device),
        "deepstack": Batch(**common, crop_pixel_values=torch.randn(4 * args.batch, 3, 128, 128),
                           crop_grids=[(2, 2)] * args.batch).to(args.device),
    }
    objective = LMObjective()
    steps = {}
    for name, model in (("plain", plain), ("deepstack", deepstack)):
        trainable = [p for n_, p in model.named_parameters() if not n_.startswith("encoder.")]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)

        def step(model=model, optimizer=optimizer, batch=batches[name]) -> None:
            loss = objective(model(batch), batch, None)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    results = median_ms_each(steps, args.steps, args.warmup, args.device)
    llm_params = sum(p.numel() for p in deepstack.llm.parameters()) / 1e6
    enc_params = sum(p.numel() for p in deepstack.encoder.parameters()) / 1e6
    print(f"LLM {llm_params:.1f}M, encoder {enc_params:.1f}M, batch {args.batch} × {ids.shape[1]} tokens ({n} visual), {args.device}: "
          f"plain {results['plain']:.1f} ms, deepstack {results['deepstack']:.1f} ms, ratio {results['deepstack'] / results['plain']:.3f}")


if __name__ == "__main__":
    main()
