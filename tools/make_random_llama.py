#!/usr/bin/env python3
"""Writes a random-weight Llama-architecture model as a Hugging Face directory, from a seed, for
speed and memory measurements at sizes where users work (no model hub is needed).

  python3 tools/make_random_llama.py --shape tinyllama-1.1b --tokenizer-from DIR --out OUT [--seed 0]

Shapes (hidden, layers, heads, kv heads, intermediate):
  tinyllama-1.1b  2048, 22, 32, 4, 5632  (TinyLlama-1.1B's shape, 1.1B parameters with vocab 49152)
  llama3-8b       4096, 32, 32, 8, 14336 (Llama-3-8B's shape; 16 GB in bf16: prefer lowrank's
                  `bench train --random-shape llama3-8b`, which never writes it)

The vocabulary is that of the tokenizer copied from --tokenizer-from (SmolLM2's: 49152 tokens, so
the benchmark corpus tokenizes), the head is untied as in TinyLlama, and weights are bf16 safetensors
drawn from N(0, 0.02) (norm weights 1), the initializer transformers uses for Llama. Needs only
numpy. The directory is written under OUT.tmp and renamed when complete.
"""
import argparse
import json
import os
import shutil
import struct

import numpy as np

SHAPES = {
    "tinyllama-1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           intermediate_size=5632),
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336),
}


def to_bf16_bytes(x):
    """float32 array -> bf16 bit patterns (round to nearest even), as little-endian bytes."""
    bits = x.astype(np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def tensors(cfg, rng):
    """(name, shape, generator of float32 values) in the order transformers names them."""
    d, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    v = cfg["vocab_size"]
    normal = lambda *shape: (lambda: rng.standard_normal(shape, dtype=np.float32) * 0.02)
    ones = lambda *shape: (lambda: np.ones(shape, dtype=np.float32))
    yield "model.embed_tokens.weight", (v, d), normal(v, d)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}"
        yield f"{p}.input_layernorm.weight", (d,), ones(d)
        yield f"{p}.self_attn.q_proj.weight", (d, d), normal(d, d)
        yield f"{p}.self_attn.k_proj.weight", (kv, d), normal(kv, d)
        yield f"{p}.self_attn.v_proj.weight", (kv, d), normal(kv, d)
        yield f"{p}.self_attn.o_proj.weight", (d, d), normal(d, d)
        yield f"{p}.post_attention_layernorm.weight", (d,), ones(d)
        yield f"{p}.mlp.gate_proj.weight", (i, d), normal(i, d)
        yield f"{p}.mlp.up_proj.weight", (i, d), normal(i, d)
        yield f"{p}.mlp.down_proj.weight", (d, i), normal(d, i)
    yield "model.norm.weight", (d,), ones(d)
    yield "lm_head.weight", (v, d), normal(v, d)


def write_safetensors(path, cfg, rng):
    """One bf16 safetensors file, written tensor by tensor (never the whole model in memory)."""
    entries, offset = [], 0
    for name, shape, _ in tensors(cfg, np.random.default_rng(0)):  # shapes only: the header first
        n = int(np.prod(shape)) * 2
        entries.append((name, shape, offset, offset + n))
        offset += n
    header = {"__metadata__": {"format": "pt"}}
    for name, shape, start, end in entries:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [start, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, shape, start, end), (_, _, make) in zip(entries, tensors(cfg, rng)):
            data = to_bf16_bytes(make())
            assert len(data) == end - start, name
            f.write(data)
    return offset // 2


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    ap.add_argument("--tokenizer-from", required=True, help="HF directory with tokenizer.json (e.g. SmolLM2's)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    tok = json.load(open(os.path.join(a.tokenizer_from, "tokenizer.json")))
    vocab = len(tok["model"]["vocab"]) + sum(1 for t in tok.get("added_tokens", []) if t["content"] not in tok["model"]["vocab"])
    src_cfg = json.load(open(os.path.join(a.tokenizer_from, "config.json")))
    cfg = dict(SHAPES[a.shape])
    cfg.update(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False, torch_dtype="bfloat16",
        bos_token_id=src_cfg.get("bos_token_id"), eos_token_id=src_cfg.get("eos_token_id"), attention_bias=False,
        mlp_bias=False, head_dim=cfg["hidden_size"] // cfg["num_attention_heads"], initializer_range=0.02,
    )
    tmp = a.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json"]:
        if os.path.exists(os.path.join(a.tokenizer_from, name)):
            shutil.copy(os.path.join(a.tokenizer_from, name), tmp)
    n = write_safetensors(os.path.join(tmp, "model.safetensors"), cfg, np.random.default_rng(a.seed))
    shutil.rmtree(a.out, ignore_errors=True)
    os.rename(tmp, a.out)
    print(f"wrote {a.out}: {a.shape}, {n / 1e9:.3f}B parameters, vocab {vocab}, seed {a.seed}")


if __name__ == "__main__":
    main()
