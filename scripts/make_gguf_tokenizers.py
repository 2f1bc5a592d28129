#!/usr/bin/env python3
"""Tiny GGUF tokenizer fixtures and the ids transformers gives for them (tests/fixtures/gguf_tokenizers/).

Three vocabularies as llama.cpp's converter writes them into GGUF metadata (no tensors: the tokenizer is all a
test reads):
  spm.gguf         SentencePiece BPE (tokenizer.ggml.model = llama; byte fallback; scores; token types), as LLaMA-2
                   and Mistral ship; trained here with the sentencepiece package on the text below.
  llama-bpe.gguf   byte-level BPE with LLaMA-3's pre-tokenizer (tokenizer.ggml.pre = llama-bpe), trained here with
                   the tokenizers package using LLaMA-3's split regex.
  qwen2.gguf       the same with Qwen2's split (tokenizer.ggml.pre = qwen2).
ids.json: for each file and each fixture string, the ids transformers' GGUF tokenizer loader gives
(AutoTokenizer.from_pretrained(dir, gguf_file=...), no special tokens added), and for spm.gguf also
sentencepiece's own ids (the two agree on these strings; the test holds qtune to transformers').

Run:  .venv/bin/python scripts/make_gguf_tokenizers.py
"""
import io
import json
import os
import sys

import gguf
import sentencepiece as spm
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers, decoders

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "gguf_tokenizers")
CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "Question: is the sky blue? Answer: yes, on a clear day it's blue.",
    "In 1969, 12345 people watched; they'd seen 3.14159 of it, we're told.",
    "Numbers like 2024 and 987654321 split differently in LLaMA-3 and Qwen2.",
    "Tabs\tand  double  spaces,\nnew lines\n\nand émigrés' café naïveté — ünïcödé 東京 🙂.",
    "def f(x):\n    return x ** 2  # squares\n",
    "I'll say you've got what we'll need; don't you think?",
] * 20
STRINGS = [
    "The capital of France is Paris.",
    " leading space and  two spaces",
    "Numbers: 12345, 3.14159 and 2024!",
    "they'd we're I'll DON'T",
    "new\nlines\n\n and\ttabs",
    "café naïveté 東京 🙂 unseen-ş",
    "def f(x):\n    return x ** 2",
    "",
]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def writer(path: str, arch: str = "llama") -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(path, arch)
    w.add_name("qtune tokenizer fixture")
    return w


def finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_spm(path: str):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=600,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   num_threads=1, seed_sentencepiece_size=1000, add_dummy_prefix=True,
                                   split_digits=True, allow_whitespace_only_pieces=True,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity")
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 5 unused, 6 byte.
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i)
                     else 6 if sp.is_byte(i) else 1)
    w = writer(path)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    finish(w)
    return sp


def make_bpe(path: str, split: str, pre: str):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    j = json.loads(tok.to_str())
    vocab = sorted(j["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    w = writer(path)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t.startswith("<|") else 1 for t, _ in vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    finish(w)


def main() -> int:
    from transformers import AutoTokenizer
    os.makedirs(OUT, exist_ok=True)
    sp = make_spm(os.path.join(OUT, "spm.gguf"))
    make_bpe(os.path.join(OUT, "llama-bpe.gguf"), LLAMA3_SPLIT, "llama-bpe")
    make_bpe(os.path.join(OUT, "qwen2.gguf"), QWEN2_SPLIT, "qwen2")
    ids = {"strings": STRINGS}
    for name in ("spm.gguf", "llama-bpe.gguf", "qwen2.gguf"):
        t = AutoTokenizer.from_pretrained(OUT, gguf_file=name)
        ids[name] = [t(s, add_special_tokens=False).input_ids for s in STRINGS]
        ids[name + ".decoded"] = [t.decode(x) for x in ids[name]]
    ids["spm.gguf.sentencepiece"] = [sp.encode(s) for s in STRINGS]
    agree = sum(a == b for a, b in zip(ids["spm.gguf"], ids["spm.gguf.sentencepiece"]))
    print(f"spm: transformers and sentencepiece agree on {agree}/{len(STRINGS)} strings")
    with open(os.path.join(OUT, "ids.json"), "w") as f:
        json.dump(ids, f, indent=1, ensure_ascii=False)
        f.write("\n")
    for n in sorted(os.listdir(OUT)):
        print(f"  {n}: {os.path.getsize(os.path.join(OUT, n))} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
