#!/usr/bin/env bash
# The main job on a fresh machine: fetch SmolLM2-135M-Instruct, measure how well it converts
# written dates to ISO format (exact match on 50 held-out examples), fine-tune a LoRA adapter on
# 400 examples, and measure again with the adapter.
# Usage: ./scripts/demo.sh [OUTPUT_DIR]   (default: runs/dates)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/dates}
command -v cargo >/dev/null || { echo "cargo is needed (https://rustup.rs)" >&2; exit 1; }
model=$(./scripts/fetch_models.sh | tail -n 1)
cargo build --release --quiet
bin=./target/release/lowrank

echo "== before: base model, 50 held-out dates"
$bin eval --model "$model" --data data/dates/eval.jsonl --exact-match --max-new-tokens 16 | tee /tmp/lowrank-demo-before.txt

echo "== fine-tuning a LoRA adapter (q_proj,v_proj, r=8) on 400 examples"
$bin train --model "$model" --data data/dates/train.jsonl --eval-data data/dates/eval.jsonl \
    --output "$out" --overwrite --max-steps 50 --batch-size 8 --lr 1e-3 --warmup-steps 5 --seq-len 128 --eval-every 25

echo "== after: with the adapter, same 50 held-out dates"
$bin eval --model "$model" --adapter "$out/adapter" --data data/dates/eval.jsonl --exact-match --max-new-tokens 16 --show | tail -n 8

before=$(grep -o 'exact match [0-9]*/[0-9]*' /tmp/lowrank-demo-before.txt)
echo "== before: $before; adapter in $out/adapter (PEFT format), loss curve in $out/loss.png"
