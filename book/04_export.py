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
# # Chapter 4 — Export: llama2.c's model files
#
# llama2.c's `run.c` reads a model as one flat binary file that it `mmap`s: a small header,
# then every weight as raw little-endian numbers, in a fixed order. No names, no JSON — the
# header's seven numbers say how big each array is, and the order says which is which. There are
# three versions:
#
# | version | header | weights | read by |
# |---|---|---|---|
# | v0 (legacy) | 7 × int32 | fp32, embeddings first, plus two unused RoPE tables | `run.c` |
# | v1 | 256 bytes: magic `ak42`, version, 7 × int32, shared-classifier flag | fp32, norms first | — |
# | v2 | as v1 + int32 group size | norms fp32, matrices int8 **Q8_0** | `runq.c` |
#
# The *classifier* is the last matrix, which turns the final hidden state into logits (§4.1).
# **Q8_0**, named after the format of llama.cpp's ggml library (8-bit values, "_0": one scale
# per group and no offset), stores weights as int8 in groups of `gs` values with one fp32 scale
# each (§4.4). llama2.c writes v1, but none of its programs reads it; this book's NumPy and C
# engines read all three. GGUF, llama.cpp's own format, and Hugging Face's come in §4.6.
#
# This chapter writes a v0 file itself, byte for byte what `babyllama.export.write_model`
# writes, then looks at v2's int8 weights and at what a model costs in memory. `read_model`
# reads all three versions back as memory-mapped NumPy arrays (no torch), validating the header
# against the file size first.

# %%
import copy
import struct
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from babyllama import book
from babyllama.config import PRESETS, ModelArgs, count_params
from babyllama.export import (
    _nbytes,
    _payload_size,
    _tensor_order,
    choose_group_size,
    dequantized,
    quantize_q80,
    read_header,
    read_model,
    write_model,
)
from babyllama.inference_numpy import NumpyLlama
from babyllama.model import Transformer

paths = book.Paths.find()
files = book.ensure_exports(paths)   # chapter 3's model, written as v0, v1 and v2
model = Transformer.from_pretrained(paths.ckpt).eval()
args = model.params
print(args)
for v, f in files.items():
    print(f"v{v}: {f.name:12} {f.stat().st_size:>10,} bytes")

# %% [markdown]
# (v0 is larger than v1 although its header is smaller: it also carries two RoPE tables,
# `seq_len × head_dim/2` floats each, that v1 and v2 leave out — see §4.1.)
#
# ## 4.1 Writing a v0 file ourselves
#
# The v0 header is seven little-endian int32: `dim, hidden_dim, n_layers, n_heads, n_kv_heads,
# vocab_size, seq_len`. There is no flag for whether the classifier (`output`, the last matrix
# that turns the final hidden state into logits) is the same matrix as the token embedding;
# llama2.c hides that bit in the **sign of vocab_size**: positive means shared, so the file holds
# the matrix once; negative means unshared, and the classifier is appended at the very end.
#
# After the header come the fp32 arrays, each flattened row-major, in this order: the token
# embedding; then *all layers'* attention norms, then all layers' `wq`, then all `wk`, `wv`,
# `wo`, ffn norms, `w1`, `w2`, `w3` (grouped by kind, not by layer); the final norm; two RoPE
# tables (cos and sin, `seq_len × head_dim/2` each) that today's `run.c` skips over because it
# computes the angles itself; and the classifier if unshared.

# %%
def v0_arrays(model: Transformer) -> list[np.ndarray]:
    """The arrays of a v0 file, in file order."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    L = range(model.params.n_layers)
    kinds = ["attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
             "ffn_norm", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    arrays = [sd["tok_embeddings.weight"]]
    for kind in kinds:                       # all layers of one kind, then the next kind
        arrays += [sd[f"layers.{l}.{kind}.weight"] for l in L]
    arrays += [sd["norm.weight"], model.freqs_cos.numpy(), model.freqs_sin.numpy()]
    if not model.shared_classifier:
        arrays.append(sd["output.weight"])
    return arrays


def write_v0(model: Transformer, path: Path) -> Path:
    a = model.params
    vocab = a.vocab_size if model.shared_classifier else -a.vocab_size   # the sign is the flag
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads,
                            vocab, a.max_seq_len))
        for arr in v0_arrays(model):
            f.write(np.ascontiguousarray(arr, dtype="<f4").tobytes())
    return path

# %% [markdown]
# Our writer against the library's, on the book model (shared classifier) and on a copy whose
# classifier is its own matrix. (`write_model` also writes to a temporary file and renames it,
# so a crash never leaves half a model behind, and it writes v1 and v2.)

# %%
untied = copy.deepcopy(model)
untied.output.weight = torch.nn.Parameter(model.tok_embeddings.weight.detach() * 0.5)
tmp = Path(tempfile.mkdtemp())
for name, m in (("shared", model), ("unshared", untied)):
    ours = write_v0(m, tmp / f"{name}_ours.bin").read_bytes()
    lib = write_model(m, tmp / f"{name}_lib.bin", version=0).read_bytes()
    diff = sum(x != y for x, y in zip(ours, lib)) + abs(len(ours) - len(lib))
    print(f"{name:9} classifier: ours {len(ours):>9,} bytes, write_model {len(lib):>9,} bytes, "
          f"bytes that differ: {diff} (must be 0); header vocab_size = "
          f"{struct.unpack_from('<i', ours, 20)[0]}")
    assert ours == lib

# %% [markdown]
# The extra bytes of the unshared file are exactly one `vocab_size × dim` fp32 matrix:
# 512 × 128 × 4 = 262,144. Here is the start of both headers: at offset 0x14, the sixth int32,
# `00 02 00 00` is 512 (little-endian: lowest byte first), and `00 fe ff ff` is -512 in two's
# complement.

# %%
def hexdump(data: bytes, width: int = 16) -> None:
    for off in range(0, len(data), width):
        chunk = data[off:off + width]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        print(f"{off:08x}  {chunk.hex(' '):<{3 * width}} {text}")


for name in ("shared", "unshared"):
    print(name)
    hexdump((tmp / f"{name}_ours.bin").read_bytes()[:28])
extra = (tmp / "unshared_ours.bin").stat().st_size - (tmp / "shared_ours.bin").stat().st_size
print(f"extra bytes {extra:,} = vocab_size * dim * 4 = {args.vocab_size * args.dim * 4:,}")
assert extra == args.vocab_size * args.dim * 4

# %% [markdown]
# ## 4.2 The v1/v2 header, byte by byte
#
# v1 and v2 start with a magic number, so a reader can tell a model file from anything else,
# and a version. Bytes 0–3 hold the magic, 4–7 the version, 8–35 the seven int32, byte 36 the
# classifier flag (1 = shared), and in v2 bytes 37–40 the group size (§4.4) — unaligned, right
# after the flag. Zeros pad the header to 256 bytes, so the arrays start at a round offset.

# %%
raw = files[2].read_bytes()
hexdump(raw[:48])
magic, version, *params = struct.unpack_from("<Ii7i", raw, 0)
print(f"magic {magic:#x} = 'ak42' in ASCII, stored little-endian (the bytes read '24ka'), "
      f"version {version}")
print(dict(zip(["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                "seq_len"], params)))
print("shared classifier:", raw[36], " group size:", struct.unpack_from("<i", raw, 37)[0])

# %% [markdown]
# ## 4.3 Where the bytes go
#
# Every offset follows from the header. Here is the v1 layout of our model (norms first, then
# the embedding and the matrices); `tests/test_export.py` builds reference files from
# llama2.c's documented layout alone and compares them with ours byte for byte. (In the bar below the norms,
# 4.6 KB in all, are too thin to see at the left edge: nearly every byte is a matrix.)

# %%
_, ver, shared, gs, header = read_header(files[1])   # args, version, shared, group size, header
offset, rows = header, []
for name in _tensor_order(1, args.n_layers, shared):
    n = _nbytes(name, args, 1, 0)
    rows.append((name, offset, n))
    offset += n
print(f"{'tensor':24} {'offset':>10} {'bytes':>10}")
for i, part in enumerate((rows[:2], rows[8:11], rows[-2:])):
    if i:
        print("...")
    for name, off, n in part:
        print(f"{name:24} {off:>10,} {n:>10,}")
print(f"end of the last array: {offset:,}; file size: {files[1].stat().st_size:,}")
assert offset == files[1].stat().st_size

groups = {}
for name, _, n in rows:
    key = name.split(".")[-1]
    groups[key] = groups.get(key, 0) + n
fig, ax = plt.subplots(figsize=(7, 1.8))
left = 0
for (key, n), color in zip(groups.items(), plt.cm.tab20.colors):
    ax.barh(0, n / 1e6, left=left / 1e6, color=color, label=key)
    left += n
ax.set_yticks([])
ax.set_xlabel("offset in the file (MB)")
ax.legend(ncol=2, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
ax.set_title("v1 file: where the bytes go")
fig.tight_layout()
plt.show()

# %% [markdown]
# The feed-forward matrices `w1`, `w2`, `w3` take about two thirds of the file, the embedding
# table (also the classifier) most of the rest.
#
# The fp32 round trip is exact: every array of the v0 file, read back, equals the PyTorch
# parameter bit for bit, and it is a view of the memory-mapped file, not a copy.

# %%
_, w = read_model(files[0])
sd = model.state_dict()
torch_name = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv",
              "wo": "attention.wo", "w1": "feed_forward.w1", "w2": "feed_forward.w2",
              "w3": "feed_forward.w3"}   # the file's short names -> the model's


def param_name(k: str) -> str:
    *layer, kind = k.split(".")
    return ".".join([*layer, torch_name.get(kind, kind), "weight"])


worst = max(float(np.abs(w[k] - sd[param_name(k)].numpy()).max()) for k in w)
print(f"{len(w)} arrays; max |file - model| = {worst} (must be exactly 0)")
assert worst == 0.0
print(type(w["layers.3.w2"].base).__name__, w["layers.3.w2"].shape, w["layers.3.w2"].dtype)

# %% [markdown]
# ## 4.4 Q8_0: int8 weights in groups
#
# v2 stores each matrix as int8 in groups of `gs` consecutive values. Each group gets its own
# scale `s = max|w| / 127`; a weight is stored as `round(w / s)` in [-127, 127] and read back as
# `q · s`. The error of each weight is at most half a step, `s / 2`: small where a group holds
# small numbers, which is why groups are short. The group size starts at 64 and is halved until
# it divides both `dim` and `hidden_dim`, so no group straddles two rows — for our model
# (`hidden_dim` 352 = 32 × 11) that gives 32.
#
# Int8 is not four times smaller than fp32: each group of 32 one-byte values also stores a
# 4-byte scale, so a weight costs 1 + 4/32 = 1.125 bytes, and the matrices shrink by
# 4 / 1.125 = 3.56×. The norms stay fp32.

# %%
def quantize_q80_naive(w: np.ndarray, gs: int):
    g = w.reshape(-1, gs)
    s = np.abs(g).max(axis=1) / 127
    q = np.round(g / s[:, None]).astype(np.int8)
    return q, s


# NBVAL_IGNORE_OUTPUT
# (the ratio's last digits depend on the trained weights)
wq = sd["layers.0.attention.wq.weight"].numpy()
q, s, maxerr = quantize_q80(wq, 32)
q_naive, s_naive = quantize_q80_naive(wq, 32)
assert np.array_equal(q.reshape(-1, 32), q_naive) and np.allclose(s, s_naive)
err = np.abs(q.reshape(-1, 32) * s[:, None] - wq.reshape(-1, 32))
ratio = float((err / (s[:, None] / 2)).max())
print(f"layer 0 wq: largest error / (scale/2) over all weights = {ratio:.6f} (bound: <= 1)")
assert ratio <= 1 + 1e-5

# %% [markdown]
# And the size ratio, measured on the files:

# %%
gs = choose_group_size(args)
v1_size, v2_size = files[1].stat().st_size, files[2].stat().st_size
print(f"group size {gs}: {1 + 4 / gs} bytes per int8 weight, predicted matrix ratio "
      f"{4 / (1 + 4 / gs):.2f}x")
print(f"files: v1 (fp32) {v1_size:,} bytes / v2 (int8) {v2_size:,} bytes = "
      f"{v1_size / v2_size:.2f}x (the norms and the 256-byte header stay as they are)")
assert abs(v1_size / v2_size - 4 / (1 + 4 / gs)) < 0.05

# %% [markdown]
# How big is the error across the whole model? The histogram shows, for every group of every
# matrix, the largest error in the group.

# %%
# NBVAL_IGNORE_OUTPUT
# (the numbers depend on the trained weights)
_, w2 = read_model(files[2])
deq = dequantized(w2)
# every matrix once: with a shared classifier, "output" is the embedding table again
matrices = [k for k in w if w[k].ndim == 2 and not (k == "output" and w.shared_classifier)]
group_err = np.concatenate([
    np.abs(deq[k] - w[k]).reshape(-1, w2.group_size).max(1) for k in matrices])
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.hist(group_err, bins=60)
ax.set_xlabel("max |error| within a group")
ax.set_ylabel("number of groups")
ax.set_title(f"Q8_0 with group size {w2.group_size}: every matrix of the model")
plt.show()
typical = float(np.median(np.concatenate([np.abs(w[k]).ravel() for k in matrices])))
print(f"{len(group_err):,} groups, median {np.median(group_err):.1e}, worst "
      f"{group_err.max():.1e}; a typical weight (median |w|) is {typical:.1e}")

# %% [markdown]
# Most groups err by a small fraction of a typical weight; the long tail to the right are
# groups that hold one large weight, which sets a coarse step for the other 31.
#
# ### Group size: error against bytes
#
# A longer group amortises its scale over more weights, but one large weight then sets a coarse
# step for all of them. Here every matrix of the model is quantized with groups of 4 to 4,096
# values (for this experiment only, groups run across row boundaries), and we measure the
# relative error ‖ŵ − w‖ / ‖w‖ against the bytes per weight.

# %%
# NBVAL_IGNORE_OUTPUT
# (the errors depend on the trained weights)
mats = [w[k] for k in matrices]
sizes = [4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
rel_err = []
for g in sizes:
    num = 0   # squared error summed over every matrix
    for m in mats:
        q_g, s_g, _ = quantize_q80(m, g)   # int8 values, one scale per group of g
        num += np.sum((q_g.reshape(-1, g) * s_g[:, None] - m.reshape(-1, g)) ** 2)
    rel_err.append(float(np.sqrt(num / sum(np.sum(m.astype(np.float64) ** 2) for m in mats))))
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(sizes, [100 * e for e in rel_err], "o-", color="tab:blue")
ax.set_xscale("log", base=2)
ax.set_xlabel("group size (weights per fp32 scale)")
ax.set_ylabel("relative error ‖ŵ − w‖/‖w‖ (%)", color="tab:blue")
ax2 = ax.twinx()
ax2.plot(sizes, [1 + 4 / g for g in sizes], "s--", color="tab:orange")
ax2.set_ylabel("bytes per weight", color="tab:orange")
ax.set_title("Q8_0 on the book model: shorter groups, smaller error, more bytes")
fig.tight_layout()
plt.show()
print("group size:   " + " ".join(f"{g:>6}" for g in sizes))
print("rel. error %: " + " ".join(f"{100 * e:6.2f}" for e in rel_err))
assert all(a <= b * 1.01 for a, b in zip(rel_err, rel_err[1:]))   # longer groups, larger error

# %% [markdown]
# From the shortest groups to the longest the error grows only a few-fold, while the bytes per
# weight fall from 2 towards 1; past 32–64 values the bytes hardly fall any further, and the
# error keeps growing — which is why llama2.c stops at 64.

# %% [markdown]
# What does int8 do to the model's predictions? We run the same 128 random token ids through
# the fp32 and the int8 file with the NumPy engine that chapter 5 builds (here only its
# `forward_tokens`: all the logits of a sequence at once) and compare the logits and the
# greedy choices.

# %%
# NBVAL_IGNORE_OUTPUT
# (the numbers depend on the trained weights)
f32, i8 = NumpyLlama.load(files[0]), NumpyLlama.load(files[2])
tokens = np.random.default_rng(0).integers(3, args.vocab_size, 128).tolist()
a, b = f32.forward_tokens(tokens, 0), i8.forward_tokens(tokens, 0)
agree = (a.argmax(-1) == b.argmax(-1)).mean()
print(f"max |Δlogit| = {np.abs(a - b).max():.2f} (logits span {a.min():.0f}..{a.max():.0f}); "
      f"greedy choices agree at {agree:.0%} of positions (the tests require > 90%)")
assert agree > 0.9

# %% [markdown]
# ## 4.5 What a model costs in memory
#
# Two things must fit in memory while a model generates: its **weights**, read once per token,
# and its **KV cache**, the keys and values of every position so far — `2 × n_layers ×
# n_kv_heads × head_dim` numbers per position, for up to `seq_len` positions. Grouped-query
# attention (GQA) lets several query heads share one KV head, which divides the cache (and
# `wk`, `wv`) by `n_heads / n_kv_heads`.
#
# Below, the weights are counted from their shapes, in fp32 and in Q8_0. The cache is counted
# for one sequence at full context, in fp32 and in int8: 1 byte per value plus one fp32 scale
# per 32 values, 1.125 bytes (the weights use each model's own group size, from 4 to 64; our
# engines keep their cache in fp32). "MHA" (plain multi-head attention) means one KV head per
# query head; "GQA" means the model's own KV heads (stories260K: 4 for 8 query heads) or, for
# the models without GQA, the fewest KV heads that serve at most 4 query heads each. Llama 2 7B
# does not use GQA; its 70B sibling does, with 8 KV heads (Touvron et al. 2023, the Llama 2
# paper).

# %%
def weight_bytes(a: ModelArgs, shared: bool, int8: bool) -> int:
    kv_dim = a.n_kv_heads * a.head_dim
    mats = (2 * a.dim * a.dim + 2 * a.dim * kv_dim + 3 * a.dim * a.hidden_dim) * a.n_layers
    mats += a.vocab_size * a.dim * (1 if shared else 2)
    norms = (2 * a.n_layers + 1) * a.dim
    per_weight = 1 + 4 / choose_group_size(a) if int8 else 4
    return int(mats * per_weight) + 4 * norms


def kv_cache_bytes(a: ModelArgs, n_kv_heads: int, bytes_per_value: float) -> int:
    return int(2 * a.n_layers * n_kv_heads * a.head_dim * a.max_seq_len * bytes_per_value)


def gqa_heads(a: ModelArgs) -> int:   # fewest KV heads with at most 4 query heads each
    return min(k for k in range(1, a.n_heads + 1) if a.n_heads % k == 0 and a.n_heads // k <= 4)


models = {"stories260K": (PRESETS["stories260K"], True), "stories15M": (PRESETS["stories15M"], True),
          "stories42M": (PRESETS["stories42M"], True), "stories110M": (PRESETS["stories110M"], True),
          "Llama 2 7B": (PRESETS["llama2-7b"], False)}
for a, shared in models.values():   # our count agrees with the library's file layout
    assert weight_bytes(a, shared, False) == _payload_size(a, 1, shared, 0)
    assert weight_bytes(a, shared, True) == _payload_size(a, 2, shared, choose_group_size(a))
    assert weight_bytes(a, shared, False) == 4 * count_params(a, shared)

MB = 1e6
table = {}
print(f"{'model':12} {'params':>7} {'ctx':>5} | {'weights fp32':>12} {'int8':>8} | "
      f"{'KV fp32 MHA':>11} {'KV fp32 GQA':>11} {'KV int8 GQA':>11}  (MB; GQA heads)")
for name, (a, shared) in models.items():
    mha = a.n_heads   # without GQA; with: the model's own KV heads if it has fewer, else ours
    gqa = a.n_kv_heads if a.n_kv_heads < a.n_heads else gqa_heads(a)
    row = [weight_bytes(a, shared, False), weight_bytes(a, shared, True),
           kv_cache_bytes(a, mha, 4), kv_cache_bytes(a, gqa, 4), kv_cache_bytes(a, gqa, 1.125)]
    table[name] = row
    print(f"{name:12} {count_params(a, shared) / 1e6:6.1f}M {a.max_seq_len:5} | "
          + f"{row[0] / MB:12.1f} {row[1] / MB:8.1f} | "
          + " ".join(f"{x / MB:11.1f}" for x in row[2:]) + f"  ({gqa} of {a.n_heads})")

fig, ax = plt.subplots(figsize=(8, 3.4))
labels = ["weights fp32", "weights int8", "KV cache fp32, no GQA", "KV cache fp32, GQA",
          "KV cache int8, GQA"]
width = 0.16
for i, label in enumerate(labels):
    ax.bar(np.arange(len(table)) + (i - 2) * width, [row[i] / MB for row in table.values()],
           width, label=label)
ax.set_yscale("log")
ax.set_xticks(range(len(table)), list(table))
ax.set_xlabel("model")
ax.set_ylabel("MB (log scale)")
ax.set_title("weights and KV cache (one sequence at full context)")
ax.legend(fontsize=7, ncol=2)
fig.tight_layout()
plt.show()

# %% [markdown]
# Two things to read off the table. From stories15M up the weights dominate (in the tiny
# stories260K, with its 512-token context, the cache is already as large as the weights), but
# the cache grows with the context and the number of layers, not with the vocabulary: Llama 2
# 7B's fp32 cache at 4,096 tokens is 4.3 GB, a sixth of its fp32 weights, per sequence — serve
# seven users at once and the caches outweigh the model. GQA with 4 query heads per KV head cuts
# that by 4, int8 by another 3.6. And int8 weights bring the 7B model from 27 GB (fp32), or
# 13.5 GB in the fp16 it usually ships in, to 7.2 GB: the difference between a server and a
# laptop. (stories260K's int8 weights are only half its fp32 ones: its
# `hidden_dim` 172 = 4 × 43 forces groups of 4, so every 4 one-byte weights carry a 4-byte
# scale, 2 bytes a weight. Chapter 6 shows what that costs in speed too.)


# %% [markdown]
# ## 4.6 What each format can and cannot say
#
# A file format is a promise: whoever reads it gets the model that was written. llama2.c's files
# keep that promise only for models that happen to match what `run.c` hard-codes. Its header has
# seven numbers; anything else is assumed. RMSNorm's epsilon is `1e-5` in `run.c`'s source, RoPE's
# base `10000` likewise. A model imported from Hugging Face with transformers' default
# `rms_norm_eps = 1e-6`, or a Llama 3 with `rope_theta = 500000`, would load and run, and
# quietly compute something else.
#
# Two other formats carry more. GGUF is llama.cpp's model file (below). A Hugging Face model is
# a directory: `config.json` with the hyperparameters, and the weights in `.safetensors` files,
# a format of named tensors (`babyllama export out/book/ckpt.pt --hf out/hf` writes one from
# the same checkpoint; chapter 2 showed the round trip). An "untied" classifier is one not
# shared with the embedding.
#
# | | llama2.c v0 | v1 | v2 | GGUF (llama.cpp) | Hugging Face dir |
# |---|---|---|---|---|---|
# | RMSNorm eps | assumed 1e-5 | assumed 1e-5 | assumed 1e-5 | `llama.attention.layer_norm_rms_epsilon` | `rms_norm_eps` |
# | RoPE theta | assumed 10000 | assumed 10000 | assumed 10000 | `llama.rope.freq_base` | `rope_theta` / `rope_parameters` |
# | GQA (n_kv_heads) | yes | yes | yes | `llama.attention.head_count_kv` | `num_key_value_heads` |
# | untied classifier | sign of vocab_size | flag byte | flag byte | `output.weight` present or not | `tie_word_embeddings` |
# | dtype | fp32 | fp32 | int8 Q8_0, groups of ≤64 | f32, f16, q8_0 (blocks of 32, fp16 scale), ... | any torch dtype |
# | vocabulary | separate tokenizer.bin | separate | separate | inside: pieces, scores, types | tokenizer.json beside it |
# | names | none: order only | none | none | every tensor named | every tensor named |
#
# So `write_model` refuses what it cannot carry, naming the field and both values. With
# `approximate=True` it writes anyway and prints how far the file's model is from the real one,
# so the choice is made knowingly: `approximation_error`, called below directly, runs 64 random
# tokens (seed 0) through the model as it is and as the file would describe it, and returns the
# largest logit difference.

# %%
import dataclasses

from babyllama.export import approximation_error, write_gguf, write_model

drifted = Transformer(dataclasses.replace(model.params, norm_eps=1e-6)).eval()
drifted.load_state_dict(model.state_dict())
try:
    write_model(drifted, paths.out / "drifted.bin")
except ValueError as e:
    print("refused:", e)
err = approximation_error(drifted)
print(f"norm_eps 1e-6 read back as 1e-5: max |delta logit| {err:.1e}")
theta = Transformer(dataclasses.replace(model.params, rope_theta=500000.0)).eval()
theta.load_state_dict(model.state_dict())
print(f"rope_theta 500000 read back as 10000: max |delta logit| {approximation_error(theta):.1e}")

# %% [markdown]
# How much each costs depends on the model and on the length of the text: a RoPE base changes
# every rotation angle, more the further a token is from another. The epsilon's error is here
# smaller than int8's (§4.4), but it is silent and depends on the model; the RoPE one changes
# the model's predictions. Either way the file describes a different model. GGUF has a field
# for each, so the same model goes there exactly.
#
# ### GGUF next to llama2.c
#
# llama.cpp's GGUF is self-describing: a magic `GGUF`, a version, then key–value metadata (the
# hyperparameters *and* the tokenizer), then a table of named tensors with their type, shape and
# offset, then the data, each tensor aligned to 32 bytes. A reader looks tensors up by name, so
# their order does not matter, and a new field does not break old readers.

# %%
import gguf

gguf_path = write_gguf(model, paths.tok_model, paths.out / "book_q8_0.gguf", dtype="q8_0")
reader = gguf.GGUFReader(gguf_path)
for key, field in reader.fields.items():
    if not key.startswith("tokenizer.ggml.") or key.endswith("_id"):
        value = field.contents()
        print(f"{key:42} {value if not isinstance(value, float) else f'{value:g}'}")
tokens = reader.fields["tokenizer.ggml.tokens"].contents()
print(f"{'tokenizer.ggml.tokens':42} {len(tokens)} pieces: {tokens[:4]} ... {tokens[300:304]}")

# %% [markdown]
# (`general.file_type` 7 is llama.cpp's code for "mostly Q8_0"; `llama.rope.dimension_count`
# is `head_dim`; the token scores and types are among the keys but not printed.)
#
# The same weights in both files. llama2.c's v1 stores each kind of matrix for all layers
# together, in a fixed order; GGUF stores each tensor under its name, layer by layer, and keeps
# the norms in f32. Its Q8_0 blocks hold 32 int8 values and an fp16 scale: 34 bytes per 32
# weights, 1.06 bytes a weight. v2 uses an fp32 scale: 1.125 bytes a weight here. So the GGUF
# file is smaller, although it also carries the tokenizer.

# %%
from babyllama.export import _tensor_order, gguf_name

v1_order = _tensor_order(1, model.params.n_layers, model.shared_classifier)
gguf_order = [t.name for t in reader.tensors]
by_name = {t.name: t for t in reader.tensors}
print(f"{'ours':24} {'v1 #':>4}   {'GGUF name':24} {'GGUF #':>6} {'type':5} shape (ne0 first)")
for name in ("layers.0.attention_norm", "layers.1.attention_norm", "layers.0.ffn_norm", "norm",
             "tok_embeddings", "layers.0.wq", "layers.1.wq", "layers.0.wk", "layers.0.w2"):
    t = by_name[gguf_name(name)]
    print(f"{name:24} {v1_order.index(name):>4}   {t.name:24} {gguf_order.index(t.name):>6} "
          f"{t.tensor_type.name:5} {[int(d) for d in t.shape]}")
print(f"GGUF file {gguf_path.stat().st_size:,} bytes; llama2.c v2 "
      f"{paths.model_bin(2).stat().st_size:,} bytes")

# %% [markdown]
# Two details a converter must get right. GGUF lists a matrix's dimensions fastest-first, so
# `wk`, of shape (out, in) = (kv_dim, dim) = (64, 128), appears as `[128, 64]`. And llama.cpp's Llama rotates
# *adjacent* pairs for RoPE, as Meta's code, llama2.c and chapter 2 do, so `wq` and `wk` go in
# unchanged; it is Hugging Face's checkpoints that store them permuted (rotate-half), and
# `Transformer.from_pretrained` undoes that permutation on the way in, as llama.cpp's own
# converter does. `tests/test_gguf.py` reads every tensor back with gguf's reader, decodes the
# Q8_0 blocks by hand, and checks that a model loaded from a Hugging Face directory lands on the
# bytes that converter's permutation gives.

# %% [markdown]
# ## Exercises
#
# Solutions are in `tests/test_exercises.py`, where they are checked.
#
# 1. **Read a v0 header by hand.** Write `read_v0_header(path) -> (dict, shared)` with `struct`
#    alone: the seven numbers, with `vocab_size` made positive, and whether the classifier is
#    shared. Check it against `read_header` on a shared and an unshared file.
# 2. **Predict a v2 file's size** from `ModelArgs`, the shared flag and the group size, without
#    writing it: 256 bytes of header, the norms in fp32, `1 + 4/gs` bytes per matrix weight.
#    Check your formula against `write_model(..., version=2)` on a tiny model.
# 3. **Asymmetric int8.** Q8_0 is symmetric: a group of all-positive weights wastes the negative
#    half of [-127, 127]. Quantize with a minimum and a step instead, `q = round((w − min) /
#    step)` in [0, 255] with `step = (max − min) / 255`, and show that on all-positive groups
#    the error is about half of Q8_0's. What does the extra fp32 per group cost in bytes?
# 4. **Llama 2 70B's cache.** 80 layers, 64 query heads, 8 KV heads, head_dim 128, 4,096
#    positions, fp16 (2 bytes): how many GB is one sequence's KV cache, and how many without
#    GQA?
