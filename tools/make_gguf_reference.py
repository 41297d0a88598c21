#!/usr/bin/env python3
"""Reference data for lowrank's GGUF support, from llama.cpp's gguf-py and transformers.

1. tests/fixtures/quant/: a small GGUF with one tensor of every supported GGML type (Q8_0, Q4_0,
   Q4_1 and F16/BF16 quantized by gguf-py from random values; Q4_K/Q5_K/Q6_K as random blocks) and
   gguf-py's dequantization of each, the expected output of lowrank's dequantizer.
2. tests/fixtures/smollm2/: for the real SmolLM2-135M-Instruct, the token ids that the
   upstream-equivalent Hugging Face tokenizer gives for strings (digits, non-ASCII text, rendered
   chat templates), and logits of 3 prompts (last position, first 4096 vocabulary entries, plus the
   argmax at every position) from transformers on the HF directory that
   scripts/setup_reference.sh builds from the same GGUF (tools/convert_smollm2_to_hf.py).

Run with the reference venv:
  .venv-reference/bin/python tools/make_gguf_reference.py --hf-dir .venv-reference/models/smollm2-135m-hf
"""
import argparse
import json
import os

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")

STRINGS = [
    "Hello, world!",
    "The year 2024 had 366 days; 3.14159 is pi and 1,000,000 is a million.",
    "Ünïcödé: café, naïve, Straße, 日本語のテキスト, emoji 🎉🚀, Ελληνικά.",
    "def f(x):\n    return x**2  # squares\n\n\ttabbed\r\nline",
    "  leading spaces and trailing   ",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "Convert 17 May 2023 to ISO format: 2023-05-17",
]

CHATS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "You answer with one word."},
     {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris"},
     {"role": "user", "content": "And of Italy?"}],
]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


def quant_fixture():
    out = os.path.join(FIXTURES, "quant")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(os.path.join(out, "quant.gguf"), "llama")
    expected = {}
    for qt in [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]:
        x = rng.standard_normal((2, 256)).astype(np.float32)
        raw = gguf.quants.quantize(x, qt) if qt != Q.F32 else x
        w.add_tensor(qt.name.lower(), raw, raw_dtype=qt)
        expected[qt.name.lower()] = gguf.quants.dequantize(raw, qt).astype(np.float32).reshape(2, 256)
    for qt in [Q.Q4_K, Q.Q5_K, Q.Q6_K]:
        block, size = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, size=(2, size), dtype=np.uint8)  # one 256-element block per row
        d = np.array([0.01, 0.003], dtype=np.float16).view(np.uint8)
        if qt == Q.Q6_K:
            raw[:, 208:210] = d[:2]
        else:
            raw[:, 0:4] = d
        w.add_tensor(qt.name.lower(), raw, raw_dtype=qt)
        expected[qt.name.lower()] = gguf.quants.dequantize(raw, qt).astype(np.float32).reshape(2, 256)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_np(expected, os.path.join(out, "expected.safetensors"))
    print("quant fixture:", sorted(expected))


def smollm2_fixture(hf_dir):
    out = os.path.join(FIXTURES, "smollm2")
    os.makedirs(out, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = {"strings": [], "chats": []}
    for s in STRINGS:
        ids["strings"].append({"text": s, "ids": tok(s, add_special_tokens=False)["input_ids"]})
    for c in CHATS:
        for gen in (False, True):
            text = tok.apply_chat_template(c, tokenize=False, add_generation_prompt=gen)
            ids["chats"].append({"messages": c, "add_generation_prompt": gen, "text": text,
                                 "ids": tok(text, add_special_tokens=False)["input_ids"]})
    with open(os.path.join(out, "tokens.json"), "w") as f:
        json.dump(ids, f, ensure_ascii=False, indent=1)
        f.write("\n")

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tensors, prompts = {}, []
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            x = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
            logits = model(input_ids=x).logits[0]
            tensors[f"prompt{i}.ids"] = x[0].to(torch.int64)
            tensors[f"prompt{i}.last_logits_head"] = logits[-1, :4096].contiguous()
            tensors[f"prompt{i}.argmax"] = logits.argmax(-1).to(torch.int64)
            prompts.append(p)
    save_file(tensors, os.path.join(out, "logits.safetensors"))
    print("smollm2 fixture:", len(ids["strings"]), "strings,", len(ids["chats"]), "chats,", len(prompts), "prompts")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="HF directory from scripts/setup_reference.sh (models/smollm2-135m-hf)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    quant_fixture()
    smollm2_fixture(args.hf_dir)


if __name__ == "__main__":
    main()
