#!/usr/bin/env bash
# Side-by-side benchmark: lowrank vs Hugging Face PEFT on tools/peft_bench.py's workload
# (same corpus, model, LoRA config, batch, sequence length and steps), plus inference and GEMM rows.
# Prints one table with the lowrank/PEFT ratios. Not a test: run it on an otherwise idle machine.
#
#   ./scripts/bench.sh                 # lowrank only, unless the reference venv is found
#   REFERENCE_VENV=/path/to/venv ./scripts/bench.sh
#
# REFERENCE_VENV (default .venv-reference) is the directory scripts/setup_reference.sh makes: a
# venv with models/ inside; its models/smollm2-135m-hf is the f32 HF copy of the same GGUF lowrank
# loads.
set -euo pipefail
cd "$(dirname "$0")/.."
ref=${REFERENCE_VENV:-.venv-reference}
peft_bench=tools/peft_bench.py
steps=${STEPS:-10}
out=${BENCH_OUT:-runs/bench}
mkdir -p "$out"
gguf=$(./scripts/fetch_models.sh | tail -n 1)
cargo build --release --quiet
bin=./target/release/lowrank
have_peft=0
py=python3  # the corpus needs no third-party package, only the standard library it is made from
if [ -x "$ref/bin/python" ] && [ -d "$ref/models/smollm2-135m-hf" ]; then
    have_peft=1
    py=$ref/bin/python
    hf="$ref/models/smollm2-135m-hf"
else
    echo "no reference venv at $ref (./scripts/setup_reference.sh makes one): lowrank rows only" >&2
fi
corpus="$out/corpus.jsonl"  # one docstring per line: the same documents as peft_bench.py
if [ ! -s "$corpus" ]; then "$py" "$peft_bench" corpus --out "$corpus" >/dev/null; fi
results="$out/results.jsonl"
: > "$results"
record() { grep '^RESULT ' | sed "s/^RESULT //; s/^{/{\"workload\": \"$1\", /" >> "$results"; }

workloads=("qv-r8-4x128:q_proj,v_proj:8:16:4:128" "qv-r8-4x512:q_proj,v_proj:8:16:4:512" "all-r16-4x128:all-linear:16:32:4:128")
for w in "${workloads[@]}"; do
    IFS=: read -r name targets r alpha batch seq <<<"$w"
    echo "== $name: lowrank" >&2
    $bin bench train --model "$gguf" --corpus "$corpus" --targets "$targets" --r "$r" --alpha "$alpha" \
        --batch "$batch" --seq "$seq" --steps "$steps" --warmup 2 --threads 2 | record "$name"
    if [ $have_peft = 1 ]; then
        # PEFT at each setting a user on this CPU would pick; the table compares with the fastest.
        for dtype in ${PEFT_DTYPES:-fp32 bf16 autocast-bf16}; do
            echo "== $name: PEFT $dtype" >&2
            "$py" "$peft_bench" train --model "$hf" --targets "$targets" --r "$r" --dtype "$dtype" \
                --alpha "$alpha" --batch "$batch" --seq "$seq" --steps "$steps" --warmup 2 --threads 2 | record "$name"
        done
    fi
done
echo "== qv-r8-4x512 with --gradient-checkpointing: lowrank" >&2
$bin bench train --model "$gguf" --corpus "$corpus" --targets q_proj,v_proj --r 8 --alpha 16 --batch 4 --seq 512 \
    --steps "$steps" --warmup 2 --threads 2 --gradient-checkpointing | record qv-r8-4x512
# Compact bases: every workload on bf16 (the AMX path where the CPU has it), 4x128 also on Q8_0/Q4_1.
for w in "${workloads[@]}"; do
    IFS=: read -r name targets r alpha batch seq <<<"$w"
    echo "== $name on a bf16 base: lowrank" >&2
    $bin bench train --model "$gguf" --corpus "$corpus" --targets "$targets" --r "$r" --alpha "$alpha" \
        --batch "$batch" --seq "$seq" --steps "$steps" --warmup 2 --threads 2 --weights bf16 | record "$name"
done
for weights in q8_0 q4_1; do
    echo "== qv-r8-4x128 on a $weights base: lowrank" >&2
    $bin bench train --model "$gguf" --corpus "$corpus" --targets q_proj,v_proj --r 8 --alpha 16 --batch 4 --seq 128 \
        --steps "$steps" --warmup 2 --threads 2 --weights "$weights" | record "qv-r8-4x128"
done
echo "== decode/prefill: lowrank" >&2
$bin bench train --model "$gguf" --corpus "$corpus" --steps 1 --warmup 0 --batch 1 --seq 32 >/dev/null  # (warms the page cache)
$bin train --model "$gguf" --data data/dates/train.jsonl --output "$out/adapter-run" --overwrite --max-steps 2 --batch-size 2 >/dev/null 2>&1
$bin bench decode --model "$gguf" --adapter "$out/adapter-run/adapter" --threads 2 | record infer
for weights in bf16 q8_0 q4_1; do
    $bin bench decode --model "$gguf" --adapter "$out/adapter-run/adapter" --threads 2 --weights "$weights" | record infer
done
if [ $have_peft = 1 ]; then
    echo "== decode: PEFT" >&2
    "$py" "$peft_bench" infer --model "$hf" --adapter "$out/adapter-run/adapter" --threads 2 | record infer
fi
echo "== sgemm" >&2
$bin bench gemm --threads 2 | record sgemm
if [ $have_peft = 1 ]; then "$py" "$peft_bench" sgemm --threads 2 | record sgemm; fi

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def fmt(x, d=1):
    return "-" if x is None else f"{x:.{d}f}"
# Each lowrank row (one per base weight format) with its ratios to the fastest PEFT row of the
# same workload (PEFT runs at fp32, bf16 and fp32 under bf16 autocast).
print(f"\n{'workload':20} {'impl':8} {'weights':13} {'tok/s':>8} {'s/step':>7} {'peak RSS MiB':>12} {'GFLOP/s':>8} {'x best PEFT tok/s':>17} {'x its RSS':>9}")
train = [r for r in rows if r.get("bench") == "train"]
for w in dict.fromkeys(r["workload"] for r in train):
    pefts = [r for r in train if r["workload"] == w and r.get("impl") != "lowrank"]
    best = max(pefts, key=lambda r: r["tok_per_s_median"], default=None)
    for r in [r for r in train if r["workload"] == w and r.get("impl") == "lowrank"] + pefts:
        name = "lowrank" if r.get("impl") == "lowrank" else "PEFT"
        weights = r.get("weights", "f32") if name == "lowrank" else r.get("dtype", "fp32")
        if r.get("gradient_checkpointing"):
            weights += "+ckpt"
        ratios = ""
        if best and name == "lowrank":
            ratios = f"{r['tok_per_s_median'] / best['tok_per_s_median']:>16.2f}x {r['peak_rss_mib'] / best['peak_rss_mib']:>8.2f}x"
        elif r is best:
            ratios = f"{'(best PEFT)':>17}"
        print(f"{w:20} {name:8} {weights:13} {fmt(r['tok_per_s_median'])!s:>8} {fmt(r['step_s_median'], 2):>7} {fmt(r['peak_rss_mib'], 0):>12} {fmt(r.get('model_gflops_per_s')):>8} {ratios}")
print(f"\n{'inference':16} {'weights':8} {'impl':8} {'decode tok/s':>12} {'prefill tok/s':>13} {'peak RSS MiB':>12}")
for r in rows:
    if r.get("bench") == "infer":
        impl = "lowrank" if r.get("impl") == "lowrank" else "PEFT"
        print(f"{r['variant']:16} {r.get('weights', 'f32'):8} {impl:8} {fmt(r.get('decode_tok_per_s')):>12} {fmt(r.get('prefill_tok_per_s')):>13} {fmt(r.get('peak_rss_mib'), 0):>12}")
for r in rows:
    if r.get("bench") == "sgemm":
        if r.get("impl", "").startswith("lowrank"):
            print(f"\nsgemm lowrank: {r['median_gflops']:.1f} GFLOP/s (2048³), {r['gflops_512x576x1536']:.1f} (512×576×1536)")
            if r.get("bf16_gflops"):
                for shape, g in r["bf16_gflops"].items():
                    print(f"bf16 on {r['bf16_kernel']} lowrank {shape} (m×k×n): forward {g['forward']:.1f}, input gradient {g['input_gradient']:.1f} GFLOP/s")
        else:
            print(f"sgemm torch: {r['torch_median_gflops']:.1f} GFLOP/s (2048³), {r['torch_512x576x1536_gflops']:.1f} (512×576×1536); numpy {r['numpy_median_gflops']:.1f}")
PY
