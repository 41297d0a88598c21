#!/usr/bin/env python3
"""PEFT interop on the real SmolLM2-135M-Instruct.

Default: trains a small PEFT LoRA adapter (q_proj,v_proj, r=2, 5 AdamW steps on fixed texts) on the
upstream-equivalent HF directory, saves it to tests/fixtures/smollm2/peft_adapter/, and records
PEFT's mean loss on the eval texts (tokens + EOS, all trained) in tests/fixtures/smollm2/interop.json.
The Rust test loads that adapter on the GGUF base and must reproduce the loss.

--check DIR: loads a lowrank-saved adapter DIR in PEFT and prints PEFT's loss on the same texts (to
compare with `lowrank eval --model <gguf> --adapter DIR --data <texts.jsonl> --format text`).

  .venv-reference/bin/python tools/make_peft_interop.py --hf-dir .venv-reference/models/smollm2-135m-hf [--check DIR]
"""
import argparse
import json
import os
import shutil

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "smollm2")

TRAIN = [
    "LoRA freezes the pre-trained weights and learns a low-rank update.",
    "The adapter is small enough to share: a few hundred kilobytes.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "In 2023, 17 May fell on a Wednesday.",
]
EVAL = [
    "Low-rank adapters let one base model serve many tasks.",
    "The quick brown fox jumps over the lazy dog 12345 times.",
    "Ünïcödé text and emoji 🎉 are tokenized byte by byte when needed.",
]


def batch(tok, texts):
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    n = max(map(len, rows))
    ids = torch.tensor([r + [tok.eos_token_id] * (n - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def loss_of(model, tok, texts):
    ids, mask, labels = batch(tok, texts)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--check", help="a lowrank-saved adapter directory to evaluate in PEFT")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.hf_dir)
    base = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32, attn_implementation="eager")
    if args.check:
        model = PeftModel.from_pretrained(base, args.check)
        print(json.dumps({"adapter": args.check, "peft_eval_loss": loss_of(model, tok, EVAL)}))
        return
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    ids, mask, labels = batch(tok, TRAIN)
    for _ in range(5):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    model.eval()
    out = os.path.join(OUT, "peft_adapter")
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    os.remove(os.path.join(out, "README.md"))
    peft_loss = loss_of(model, tok, EVAL)
    with model.disable_adapter():
        base_loss = loss_of(model, tok, EVAL)
    data = {"eval_texts": EVAL, "peft_eval_loss": peft_loss, "base_eval_loss": base_loss}
    with open(os.path.join(OUT, "interop.json"), "w") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(data)


if __name__ == "__main__":
    main()
