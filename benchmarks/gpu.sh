#!/usr/bin/env bash
# The GPU measurements, on one accelerator, in under 8 minutes, from the README's install (pip install -e .):
#   1. MFU of a packed 4K SFT step at LLaVA-1.5-7B's shape and at a Qwen2-0.5B-class shape (bf16, flash-attention-2
#      when installed else SDPA, activation checkpointing), with and without the vision tower's FLOPs;
#   2. training-step time and memory of mllm-kit against transformers' LLaVA (benchmarks/mfu.py --compare hf);
#   3. generation throughput against transformers' generate (benchmarks/generate.py).
# Results go to ${1:-gpu-results}/ as JSON and text; nothing is downloaded.
#
#     bash benchmarks/gpu.sh [OUT_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$(mkdir -p "${1:-gpu-results}" && cd "${1:-gpu-results}" && pwd)"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$here"
python -c "import torch; assert torch.cuda.is_available(), 'benchmarks/gpu.sh needs a CUDA device'; print(torch.cuda.get_device_name())" | tee "$out/device.txt"
timeout 240 python gpu_step.py --config llava15-7b --steps 5 --warmup 3 --json "$out/llava15-7b.json" | tee "$out/llava15-7b.txt"
timeout 90 python gpu_step.py --config qwen2-0.5b --steps 8 --warmup 3 --json "$out/qwen2-0.5b.json" | tee "$out/qwen2-0.5b.txt"
timeout 90 python mfu.py --device cuda --dtype bfloat16 --config llava-100m qwen2-152k --compare hf --repeats 3 \
    --json "$out/mfu-100m.json" | tee "$out/mfu-100m.txt"
timeout 60 python generate.py --device cuda --size 20M --steps 5 --new-tokens 64 | tee "$out/generate.txt"
echo "results in $out"
