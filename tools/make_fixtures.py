#!/usr/bin/env python3
"""Reference fixtures for lowrank's numerical tests, computed with PyTorch + transformers + PEFT.

Builds tiny random-weight decoder models from fixed seeds, wraps them with PEFT LoRA (B non-zero so
the adapter matters), and dumps what the Rust tests compare against:

  tests/fixtures/<name>/model/                  HF directory (config.json + safetensors)
  tests/fixtures/<name>/peft_adapter/           adapter saved by PEFT (the initial LoRA weights)
  tests/fixtures/<name>/expected.safetensors    batch, logits, loss, LoRA grads, weights after 3 steps
  tests/fixtures/<name>/meta.json               optimizer/schedule settings and library versions

Run with the reference venv (scripts/setup_reference.sh):
  .venv-reference/bin/python tools/make_fixtures.py [--out tests/fixtures]
CI never runs this; the outputs are committed.
"""
import argparse
import copy
import json
import os
import shutil

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          get_scheduler)

# Each case: a model config, how it is stored, a LoRA config and a 3-step training recipe.
CASES = {
    "tiny-llama": dict(
        seed=1234,
        model_cls=LlamaForCausalLM,
        config=LlamaConfig(
            vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=128, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
            bos_token_id=1, eos_token_id=2, pad_token_id=0),
        dtype=torch.float32, shard=None,
        lora=dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                  rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 2},
                  task_type="CAUSAL_LM"),
        train=dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, schedule="linear",
                   warmup_steps=1, total_steps=5, max_grad_norm=1.0, steps=3),
    ),
    "tiny-qwen2": dict(
        seed=4321,
        model_cls=Qwen2ForCausalLM,
        config=Qwen2Config(
            vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
            max_position_embeddings=128, tie_word_embeddings=False, use_sliding_window=False,
            bos_token_id=1, eos_token_id=2),
        # bf16 storage and several shards exercise the loader; the reference math runs in f32 on
        # the bf16-rounded weights, so both sides see identical numbers.
        dtype=torch.bfloat16, shard="60KB",
        lora=dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                  use_rslora=True, layers_to_transform=[1], task_type="CAUSAL_LM"),
        train=dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, schedule="cosine",
                   warmup_steps=1, total_steps=5, max_grad_norm=1.0, steps=3),
    ),
}


def randomize(model, dtype):
    """Weights large enough that attention and every LoRA path matter (HF's 0.02 init is too flat)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith("bias"):
                v = 0.1 * torch.randn(p.shape, generator=g)
            else:
                v = 0.08 * torch.randn(p.shape, generator=g)
            p.copy_(v.to(dtype).to(torch.float32))


def make_batch(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = [10, 7, 4]
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        ids[b, n:] = 0  # right padding with the pad id
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :3] = -100  # a masked "prompt" at the start of row 0
    return ids, mask, labels


def peft_key(name):
    """PEFT's saved key for a parameter name of the wrapped model (adapter name removed)."""
    return name.replace(".default", "")


def build_case(name, case, out_root):
    out = os.path.join(out_root, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    torch.manual_seed(case["seed"])
    model = case["model_cls"](case["config"]).to(torch.float32)
    model.config._attn_implementation = "eager"
    randomize(model, case["dtype"])
    model.eval()

    save_kwargs = dict(safe_serialization=True)
    if case["shard"]:
        save_kwargs["max_shard_size"] = case["shard"]
    # Convert a copy: model.to(bf16) would also round the rotary inv_freq buffer of the reference.
    copy.deepcopy(model).to(case["dtype"]).save_pretrained(os.path.join(out, "model"), **save_kwargs)

    lcfg = LoraConfig(**case["lora"])
    pm = get_peft_model(model, lcfg)
    g = torch.Generator().manual_seed(case["seed"] + 1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(os.path.join(out, "peft_adapter"))
    lora_params = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]

    ids, mask, labels = make_batch(case["config"].vocab_size, case["seed"] + 2)
    tensors = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    res = pm(input_ids=ids, attention_mask=mask, labels=labels)
    tensors["logits"] = res.logits.detach().contiguous()
    tensors["loss"] = res.loss.detach().reshape(1)
    res.loss.backward()
    for n, p in lora_params:
        tensors["grad." + peft_key(n)] = p.grad.detach().clone()

    t = case["train"]
    opt = torch.optim.AdamW([p for _, p in lora_params], lr=t["lr"], betas=t["betas"], eps=t["eps"],
                            weight_decay=t["weight_decay"])
    sched = get_scheduler(t["schedule"], opt, num_warmup_steps=t["warmup_steps"],
                          num_training_steps=t["total_steps"])
    losses, norms, lrs = [], [], []
    for _ in range(t["steps"]):
        opt.zero_grad()
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for _, p in lora_params], t["max_grad_norm"])
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        losses.append(loss.item())
        norms.append(norm.item())
    for n, p in lora_params:
        tensors["step3." + peft_key(n)] = p.detach().clone()
    tensors["step_losses"] = torch.tensor(losses, dtype=torch.float32)
    tensors["step_grad_norms"] = torch.tensor(norms, dtype=torch.float32)
    tensors["step_lrs"] = torch.tensor(lrs, dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "expected.safetensors"))

    meta = dict(train=dict(t, betas=list(t["betas"])), lora=case["lora"],
                versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                              peft=peft.__version__))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"{name}: loss {res.loss.item():.6f}, step losses {losses}, grad norms {norms}, lrs {lrs}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures"))
    ap.add_argument("--only", nargs="*", help="case names to rebuild (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    for name, case in CASES.items():
        if not args.only or name in args.only:
            build_case(name, case, args.out)


if __name__ == "__main__":
    main()
