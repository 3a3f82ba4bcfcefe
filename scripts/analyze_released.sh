#!/usr/bin/env bash
# Routing analysis of two released MoE models on the built-in corpus's held-out texts.
# Needs network access to the Hugging Face hub and a GPU (not run in CI):
#   OLMoE-1B-7B        ~6.9B parameters, ~14 GB in bf16: one 24 GB GPU
#   Qwen1.5-MoE-A2.7B  ~14.3B parameters, ~29 GB in bf16: one 40/80 GB GPU, or two 24 GB GPUs
#                      (device_map="auto" spreads the layers over every visible GPU)
# moescope estimates the memory before loading and refuses when it cannot fit (--force overrides).
set -euo pipefail
OUT=${OUT:-runs/released}
unset HF_HUB_OFFLINE HF_DATASETS_OFFLINE TRANSFORMERS_OFFLINE  # the models come from the hub

moescope data build --out "$OUT/data"   # built-in code / math / prose; only its held-out texts are used

moescope analyze --model allenai/OLMoE-1B-7B-0924 --data "$OUT/data" --out "$OUT/olmoe" \
  --dtype bf16 --device cuda --context 512 --max-blocks-per-domain 64

moescope analyze --model Qwen/Qwen1.5-MoE-A2.7B --data "$OUT/data" --out "$OUT/qwen-moe" \
  --dtype bf16 --device cuda --context 512 --max-blocks-per-domain 64

moescope compare "$OUT/olmoe" "$OUT/qwen-moe" --label OLMoE --label Qwen1.5-MoE --out "$OUT/compare"
echo "reports: $OUT/olmoe/report/report.html $OUT/qwen-moe/report/report.html $OUT/compare/comparison.html"
