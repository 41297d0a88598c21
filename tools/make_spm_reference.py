#!/usr/bin/env python3
"""Reference data for llama-style (SentencePiece) GGUF tokenizers: tests/fixtures/spm/.

No llama-style GGUF model is reachable from these machines, so this script makes one the way
llama.cpp's convert_hf_to_gguf.py does for a Llama/Mistral `tokenizer.model`:
1. trains a small SentencePiece BPE model (byte fallback, identity normalization, dummy prefix,
   no whitespace collapsing: the settings of Llama 2 / Mistral's tokenizer.model) on a generated
   corpus, with two user-defined symbols;
2. writes its pieces, scores and token types to `tokenizer.gguf` under llama.cpp's keys
   (tokenizer.ggml.model = "llama", no merges: readers rebuild them from the scores);
3. records, for a set of strings (digits, non-ASCII text that falls back to bytes, whitespace runs,
   control and user-defined tokens inline), the ids llama.cpp's SPM tokenizer gives: the text is cut
   at special tokens, each text fragment is encoded by SentencePiece (which prepends the dummy-prefix
   space to it, as llama.cpp does after the start and after every special token) and BOS goes first.
   As a cross-check, transformers' own GGUF conversion must agree on the strings where its
   `Metaspace(prepend_scheme="first")` rule is the same rule (no special token inside, no leading
   space: transformers adds no prefix to text that already starts with a space, nor after a special
   token; SentencePiece and llama.cpp do).

Run with the reference venv:
  .venv-reference/bin/python tools/make_spm_reference.py   (scripts/setup_reference.sh makes it)
"""
import json
import os
import random
import re
import tempfile

import gguf
import sentencepiece as spm
from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "spm")

STRINGS = [
    "Hello, world!",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "Ünïcödé: café, naïve, Straße, 日本語, emoji 🎉, Ελληνικά.",
    "def f(x):\n    return x**2  # squares\n\n\ttabbed",
    "  leading spaces and trailing   ",
    "<|user|>what is the date?<|end|>",
    "Question?</s>Answer <s> again",
    "Convert 17 May 2023 to ISO format: 2023-05-17",
    "",
]

WORDS = (
    "the a model learns low rank update of its weights and we train only the adapter while the base stays frozen "
    "date month year day convert format iso answer question hello world café naïve straße water river mountain "
    "function return value list number token text sequence attention query value projection layer"
).split()


def corpus(n=3000, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, len(words)), str(rng.randint(0, 3000)))
        line = " ".join(words)
        if rng.random() < 0.2:
            line = line.capitalize() + "."
        lines.append(line)
    return lines


def main():
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "corpus.txt")
        with open(text, "w", encoding="utf-8") as f:
            f.write("\n".join(corpus()))
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(
            input=text,
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=400,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            split_digits=True,
            user_defined_symbols=["<|user|>", "<|end|>"],
            character_coverage=1.0,
            num_threads=1,
            minloglevel=2,
        )
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")

    # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    def token_type(i):
        if sp.IsUnknown(i):
            return 2
        if sp.IsControl(i):
            return 3
        if sp.IsByte(i):
            return 6
        if sp.IsUnused(i):
            return 5
        return 4 if sp.IdToPiece(i) in ("<|user|>", "<|end|>") else 1

    n = sp.GetPieceSize()
    path = os.path.join(OUT, "tokenizer.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.IdToPiece(i) for i in range(n)])
    w.add_token_scores([sp.GetScore(i) for i in range(n)])
    w.add_token_types([token_type(i) for i in range(n)])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    special = {sp.IdToPiece(i): i for i in range(n) if token_type(i) in (3, 4)}
    split = re.compile("(" + "|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)) + ")")

    def llama_cpp_ids(text):
        ids = [sp.bos_id()]
        for fragment in split.split(text):
            if fragment in special:
                ids.append(special[fragment])
            elif fragment:
                ids += sp.encode(fragment)
        return ids

    hf = AutoTokenizer.from_pretrained(OUT, gguf_file="tokenizer.gguf")
    cases = []
    for s in STRINGS:
        want = llama_cpp_ids(s)
        if not split.search(s) and not s.startswith(" "):
            got = hf(s)["input_ids"]
            assert got == want == [sp.bos_id()] + sp.encode(s), f"transformers and SentencePiece disagree on {s!r}:\n{got}\n{want}"
        cases.append({"text": s, "ids": want, "pieces": [sp.IdToPiece(i) for i in want], "decoded": sp.decode(sp.encode(s))})
    expected = {"bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "unk_id": sp.unk_id(), "vocab_size": n, "strings": cases}
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False, indent=1)
    print(f"wrote {path} ({os.path.getsize(path)} bytes, {n} pieces) and expected.json ({len(cases)} strings)")


if __name__ == "__main__":
    main()
