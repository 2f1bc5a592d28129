"""Writes tests/fixtures/tiny_llama*/tokenizer.json: a byte-level BPE with no merges whose token id is the byte
value, so the tiny models' 256-token vocabulary covers any text. Run with the reference venv:
    .venv/bin/python scripts/make_tiny_tokenizer.py
"""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# GPT-2's byte -> printable-character map (the alphabet ByteLevel works in).
bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
cs = bs[:]
n = 0
for b in range(256):
    if b not in bs:
        bs.append(b)
        cs.append(256 + n)
        n += 1
byte_to_char = dict(zip(bs, [chr(c) for c in cs]))
vocab = {byte_to_char[b]: b for b in range(256)}
tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
for d in ["tests/fixtures/tiny_llama", "tests/fixtures/tiny_llama_untied"]:
    tok.save(f"{d}/tokenizer.json")
assert tok.encode("Hi there").ids == list(b"Hi there")
