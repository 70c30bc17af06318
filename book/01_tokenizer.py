# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 1 — The tokenizer
#
# A language model reads numbers, not letters. The tokenizer turns text into a list of integer
# ids and back. Llama 2 uses **byte-pair encoding** (BPE) as implemented by SentencePiece:
# start from single characters, and repeatedly glue together the pair of neighbours that the
# vocabulary scores highest. Common words become one token, rare words several, and any
# character the vocabulary lacks is spelled as its UTF-8 bytes (**byte fallback**), so no text
# is ever "unknown".
#
# In this chapter we
# 1. learn BPE merges by hand on a paragraph,
# 2. train a real 512-piece vocabulary on the book's story corpus (and the requests that
#    chapter 5 will prompt the model with),
# 3. write llama2.c's `tokenizer.bin`, and
# 4. write our own encoder that reads only `tokenizer.bin` — and check it gives exactly
#    SentencePiece's ids.
#
# The finished code lives in `babyllama.tokenizer`; every later chapter uses it (chapter 3 to
# encode the training data, chapter 5 to encode chat turns, chapters 5 and 6 to turn generated
# ids back into text).
#
# **The data.** llama2.c trains on TinyStories: two million short stories written by GPT-3.5
# and GPT-4, a 1.5 GB download. This book must run offline in a few minutes, so it uses a
# built-in corpus instead, *generated from templates* by `babyllama.stories`: each story draws
# a cast from lists of names and animals, a place and an object, then strings together an
# opening, a find, a meeting, one of a dozen problems with its fixed resolution, and sometimes
# a moral — each a sentence frame with blanks. The stories are grammatical and consistent, but
# narrow. What that means for every number in this book is measured below.

# %%
import collections
import re
import struct

import matplotlib.pyplot as plt
import numpy as np
import sentencepiece as spm

from babyllama import book
from babyllama import data as D
from babyllama.tokenizer import Tokenizer, read_tokenizer_bin, train_tokenizer

paths = book.Paths.find()
train_docs, val_docs = D.load_corpus("stories", paths.data)
print(f"{len(train_docs)} training stories, {len(val_docs)} validation stories")
print(train_docs[0][:300], "...")

# %%
words = collections.Counter(w for s in train_docs for w in re.findall(r"[a-z']+", s.lower()))
sentences = collections.Counter(t for s in train_docs for t in re.split(r"(?<=[.!?])\s+", s))
repeated = sum(n for n in sentences.values() if n > 1) / sum(sentences.values())
print(f"{sum(words.values()):,} words, but only {len(words):,} different ones")
print(f"{sum(sentences.values()):,} sentences; {repeated:.0%} of them occur more than once, "
      f"word for word")
print("most common:", sentences.most_common(3))

# %% [markdown]
# A closed list of under 2,000 words, and most sentences repeated verbatim somewhere else: a
# model learns this corpus far faster, and to a far lower loss, than it would learn
# TinyStories (TinyStories has tens of thousands of distinct words, and its sentences rarely
# repeat). So the losses in chapter 3 say how well the model learned *these* stories; they are
# not comparable with llama2.c's published numbers. Everything in the book also runs on the
# real data: `--data tinystories` on the command line (chapter 3 gives the commands).

# %% [markdown]
# ## 1.1 BPE by hand
#
# Take a paragraph, split it into words, and each word into characters. Count every adjacent
# pair; merge the most frequent pair into a new symbol everywhere; repeat. The list of merges
# *is* the tokenizer. (SentencePiece scores pieces by the order they were learned, which is
# why "best score first" in the encoder below means "earliest merge first".)

# %%
def bpe_train_toy(text: str, n_merges: int) -> list[tuple[str, str]]:
    words = collections.Counter("▁" + w for w in text.split())
    vocab = {w: list(w) for w in words}
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, n in words.items():
            syms = vocab[w]
            for a, b in zip(syms, syms[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        for w in vocab:   # apply the merge everywhere
            syms, out, i = vocab[w], [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            vocab[w] = out
    return merges


paragraph = " ".join(train_docs[:3])
toy_merges = bpe_train_toy(paragraph, 12)
for i, (a, b) in enumerate(toy_merges):
    print(f"merge {i:2d}: {a!r:8} + {b!r:8} -> {a + b!r}")

# %% [markdown]
# The first merges glue a space to the most common letters and build the most common words
# ("▁the", "▁a"), exactly as you would expect from English. (`▁` is SentencePiece's mark for
# "a space came before this": words carry their leading space, so decoding is concatenation.)
#
# ## 1.2 The real vocabulary
#
# `train_tokenizer` trains SentencePiece with Llama 2's settings: BPE, byte fallback, digits
# split one by one, whitespace kept as `▁`, no normalization, and ids 0/1/2 for
# `<unk>`/`<s>`/`</s>`. One practical detail: SentencePiece trains on *sentences* and silently
# drops any longer than `max_sentence_length` (4,192 bytes). TinyStories has stories longer than
# that, so `babyllama.tokenizer.sentences` cuts documents at newlines, then sentence ends, before
# training — no story is lost.
#
# **What it reads.** A tokenizer should know the text its model will be prompted with, not
# only the text it is trained on. Chapter 5 teaches the model to answer requests in
# Llama 2's chat format — `[INST] Tell me a story about a shy fox named Max who finds a red
# lantern. [/INST]` — and our stories never write "[" or "]", and say "story" and "about" too
# rarely (a few thousand times in 2.7 million words) to earn a merge. So the tokenizer trains on
# the stories *and* 20,000 such requests (`data.tokenizer_docs`): below we measure what that
# buys.

# %%
book.ensure_tokenizer(paths)
tokenizer_text = D.tokenizer_docs(train_docs)   # what ensure_tokenizer trained on
sp = spm.SentencePieceProcessor(model_file=str(paths.tok_model))
pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
print("vocabulary size:", sp.vocab_size())
print("special:", pieces[:3], " bytes:", pieces[3:6], "...", pieces[257:259])
print("first merges:", pieces[259:279])
print("last pieces:", pieces[-10:])

# %% [markdown]
# The first 259 ids are the 3 special tokens and the 256 byte pieces (byte fallback). Then
# come the merges, in the order they were learned (best score first). And the tail is single
# characters: SentencePiece gives every character of the training text a piece of its own —
# the merges are built from them, and the encoder starts from them — and it files them *after*
# all merges, most frequent first, with the lowest scores. Those scores never matter: the
# encoder only compares the scores of merged pairs.

# %%
singles = [i for i in range(259, sp.vocab_size()) if len(pieces[i]) == 1]
merges = sp.vocab_size() - 259 - len(singles)
print(f"3 special + 256 bytes + {merges} merges + {len(singles)} characters = {sp.vocab_size()}")
print(f"single characters are ids {singles[0]}..{singles[-1]}: the last {len(singles)} pieces "
      f"(contiguous: {singles == list(range(singles[0], sp.vocab_size()))})")
chars = collections.Counter("".join(tokenizer_text).replace(" ", "▁"))
freq = [chars[pieces[i]] for i in singles]
print("how often each occurs in the training text:", freq[:4], "...", freq[-4:])
out_of_order = sum(a < b for a, b in zip(freq, freq[1:]))
print(f"neighbours out of frequency order: {out_of_order} of {len(freq) - 1} (bound 0)")
assert singles == list(range(singles[0], sp.vocab_size())) and out_of_order == 0

# %% [markdown]
# What did the 20,000 requests buy? We train the same vocabulary on the stories alone and
# encode one request, and the validation stories, with both:

# %%
stories_only = spm.SentencePieceProcessor(model_file=str(train_tokenizer(
    train_docs, paths.out / "vocab_sweep" / "tok512_stories_only", 512)))
request = "[INST] Tell me a story about a shy fox named Max who finds a red lantern. [/INST]"
turns = D.tokenizer_docs([], requests=1000)   # 1,000 of the requests chapter 5 trains on
story_tokens = {}
for name, m in (("stories only", stories_only), ("stories + requests", sp)):
    story_tokens[name] = sum(len(ids) for ids in m.encode(val_docs))
    prompt = 1 + np.mean([len(ids) for ids in m.encode(turns)])   # + BOS, as chat mode feeds
    print(f"{name:>18}: the request is {len(m.encode(request)):2d} tokens "
          f"{m.encode(request, out_type=str)[:8]} ...;\n{'':20}a prompt (BOS + request) "
          f"{prompt:.1f} on average; validation stories {story_tokens[name]:,} tokens")
growth = story_tokens["stories + requests"] / story_tokens["stories only"] - 1
print(f"stories grow by {growth:.1%} (bound 5%)")
assert len(sp.encode(request)) < len(stories_only.encode(request)) and growth < 0.05

# %% [markdown]
# A request shrinks by about a third (a chapter 5 prompt from ~59 tokens to ~42), and stories
# grow by a few percent: a handful of merges ("▁story", "INST", "▁about") moved from story
# words to request words. Fine-tuning pays for every prompt token in every step, so each of
# chapter 5's fine-tuning steps gets cheaper (not fewer of them: chapter 5 shows both).
#
# All told, under 200 of our 512 ids are learned merges. How much text does one token carry?
# A bigger vocabulary packs more bytes into each token (shorter sequences, a bigger embedding
# table). We train a few sizes on a sample of the stories:

# %%
sample = train_docs[:2000]
sizes = [384, 512, 1024, 2048]
bytes_per_token = []
for v in sizes:
    m = spm.SentencePieceProcessor(model_file=str(train_tokenizer(
        sample, paths.out / "vocab_sweep" / f"tok{v}", v)))
    n_tokens = sum(len(ids) for ids in m.encode(val_docs[:500]))
    bytes_per_token.append(sum(len(s.encode()) for s in val_docs[:500]) / n_tokens)
for v, b in zip(sizes, bytes_per_token):
    print(f"vocab {v:5d}: {b:.2f} bytes per token")
print("each size carries more bytes per token than the one before:",
      " < ".join(f"{b:.2f}" for b in bytes_per_token))
assert all(a < b for a, b in zip(bytes_per_token, bytes_per_token[1:]))

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
ax1.plot(sizes, bytes_per_token, "o-")
ax1.set_xscale("log", base=2)
ax1.set_xlabel("vocabulary size")
ax1.set_ylabel("bytes per token")
ax1.set_title("bigger vocabulary, longer tokens")
lengths = [len(p.replace("▁", " ").encode()) for p in pieces[259:]]
ax2.hist(lengths, bins=range(1, max(lengths) + 2), align="left", rwidth=0.8)
ax2.set_xlabel("piece length (bytes)")
ax2.set_ylabel("pieces")
ax2.set_title(f"length of the {len(lengths)} non-byte pieces\n"
              f"({merges} merges + {len(singles)} single characters)")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 1.3 tokenizer.bin
#
# llama2.c's C code cannot read SentencePiece's protobuf, so `export_tokenizer_bin` writes a
# flat file: an int32 `max_token_length`, then for every token a float32 score, an int32 length
# and the bytes, with `▁` written as a plain space. We read the first records back with
# `struct` alone:

# %%
raw = paths.tok_bin.read_bytes()
(max_len,) = struct.unpack_from("i", raw, 0)
off, records = 4, []
for _ in range(5):
    score, n = struct.unpack_from("fi", raw, off)
    records.append((score, raw[off + 8: off + 8 + n]))
    off += 8 + n
print("max_token_length:", max_len)
for i, (score, b) in enumerate(records):
    print(i, score, b)
print(f"{len(raw):,} bytes for {sp.vocab_size()} tokens")
pieces_bin, scores_bin, _ = read_tokenizer_bin(paths.tok_bin)
assert [b for _, b in records] == pieces_bin[:5]
print("the library's read_tokenizer_bin gives the same first 5 records; the file holds",
      len(pieces_bin), "tokens")

# %% [markdown]
# Token 1 (`<s>`, BOS) is stored as `b'\n<s>\n'` and token 2 (`</s>`, EOS) as `b'\n</s>\n'`,
# not as the piece names. llama2.c's exporter does this, and we copy it byte for byte: if a
# decoder ever prints these tokens, the boundary between two stories shows on a line of its
# own. They never come up when *encoding* — the encoder looks up only the characters of the
# text and the merges of normal pieces, and these strings are neither — and run.c stops
# generating when the model emits BOS, so in practice they are not printed either. Their score
# (0.0) does not matter for the same reason.

# %% [markdown]
# ## 1.4 Our own encoder
#
# run.c encodes text in three steps: put a space in front (SentencePiece's "dummy prefix"),
# look up every character (or fall back to its bytes), then merge greedily: find the adjacent
# pair whose concatenation is in the vocabulary with the best score, merge it, repeat until no
# pair merges. Here is that algorithm, written the simple way:

# %%
def encode_naive(text: str, pieces: list[bytes], scores: list[float]) -> list[int]:
    # text -> id for the normal pieces (ids >= 259): the special and byte pieces are never
    # matched by their names (`<s>`, `<0x41>`) when encoding
    lookup = {p.decode("utf-8", "replace"): i for i, p in enumerate(pieces) if i >= 259}
    ids = []
    for ch in " " + text:
        if ch in lookup:
            ids.append(lookup[ch])
        else:
            ids.extend(3 + b for b in ch.encode("utf-8"))   # byte fallback
    while True:
        best, where = None, None
        for i in range(len(ids) - 1):   # the best-scoring pair anywhere; byte pieces never merge
            merged = lookup.get((pieces[ids[i]] + pieces[ids[i + 1]]).decode("utf-8", "replace"))
            if merged is not None and ids[i] >= 259 and ids[i + 1] >= 259 and \
                    (best is None or scores[merged] > scores[best]):
                best, where = merged, i
        if best is None:
            return ids
        ids[where:where + 2] = [best]


text = "Once upon a time, Lily found a shiny ball. 🦙"
ids = encode_naive(text, pieces_bin, scores_bin)
print(ids)
print([pieces_bin[i] for i in ids])
print("same ids as SentencePiece:", ids == sp.encode(text))
assert ids == sp.encode(text)

# %% [markdown]
# Each pass scans every pair, so a text of *n* characters costs *O(n²)*. The library's
# `Tokenizer` does the same merges with a priority queue over a linked list of symbols
# (*O(n log n)*), breaking ties by the leftmost pair exactly as run.c and SentencePiece do.
# Decoding is the reverse: concatenate the pieces, turn `<0xXX>` pieces back into bytes, and
# drop the dummy-prefix space after BOS.

# %%
tok = Tokenizer.from_bin(paths.tok_bin)
ids = tok.encode(text, bos=True)
assert ids == [1, *encode_naive(text, pieces_bin, scores_bin)]
print(ids, "->", repr(tok.decode(ids)))

# %% [markdown]
# Now the real check: on 2,000 stories of the corpus, and on strings chosen to be awkward
# (runs of spaces, newlines, emoji, CJK, control characters), our ids must equal
# SentencePiece's, and decoding must give the text back. The test suite repeats this with
# Llama 2's own 32,000-piece model and with random Unicode strings from `hypothesis`.

# %%
awkward = ["", " ", "  two  spaces", "line\nbreaks\n\n", "tab\there", "日本語 中文",
           "emoji 🦙🔥👍🏽", "\x00\x07 control", "naïve café", "1234567890"]
for s in train_docs[:2000] + awkward:
    ids = tok.encode(s, bos=True)
    assert ids == [1, *sp.encode(s)], s
    assert tok.decode(ids) == s
print("our encoder == sentencepiece on", 2000 + len(awkward), "texts")

# %% [markdown]
# Chapter 3 trains on these ids. `babyllama pretokenize` encodes the whole corpus once into
# `uint16` shards — a BOS token (id 1) before each story — that training reads with `np.memmap`.

# %%
bins = book.ensure_shards(paths, progress=False)
shard = np.memmap(sorted(bins.glob("train_*.bin"))[0], dtype=np.uint16, mode="r")
print(shard[:24].tolist())
print(repr(tok.decode(shard[:24].tolist())))
print(f"{sum(len(np.memmap(f, dtype=np.uint16, mode='r')) for f in bins.glob('*.bin')):,} "
      f"tokens in {len(list(bins.glob('*.bin')))} shards")

# %% [markdown]
# ## Exercises
#
# 1. **Merges by hand.** Run `bpe_train_toy` on the sentence `"the cat sat on the mat"`.
#    Which pair merges first, although "the" is the only repeated word? How many merges does
#    it take to make `▁the` a single symbol?
# 2. **Byte fallback.** Encode `"über"` with our 512-piece tokenizer. Which ids are byte pieces,
#    and which bytes are they? Why does `ü` take two?
# 3. **Cost of the vocabulary.** Our 512 pieces average about 2 bytes per token on the
#    validation stories. How many tokens does the whole validation set take with 512 pieces,
#    and with the 2048-piece sweep vocabulary? What does each extra piece cost the model
#    (chapter 2: one row of the embedding matrix)?
#
# Solutions: `tests/test_exercises.py`.
