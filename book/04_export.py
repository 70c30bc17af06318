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
# `babyllama.export.write_model` writes all three; `read_model` reads them back as memory-mapped
# NumPy arrays (no torch), validating the header against the file size first.

# %%
import struct

import matplotlib.pyplot as plt
import numpy as np

from babyllama import book
from babyllama.export import (
    _nbytes,
    _tensor_order,
    dequantized,
    quantize_q80,
    read_header,
    read_model,
)
from babyllama.inference_numpy import NumpyLlama
from babyllama.model import Transformer

paths = book.Paths.find()
files = book.ensure_exports(paths)   # chapter 3's model, written as v0, v1 and v2
model = Transformer.from_pretrained(paths.ckpt).eval()
for v, f in files.items():
    print(f"v{v}: {f.name:12} {f.stat().st_size:>10,} bytes")

# %% [markdown]
# ## 4.1 The header, byte by byte

# %%
def hexdump(data: bytes, width: int = 16) -> None:
    for off in range(0, len(data), width):
        chunk = data[off:off + width]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        print(f"{off:08x}  {chunk.hex(' '):<{3 * width}} {text}")


raw = files[2].read_bytes()
hexdump(raw[:48])
magic, version, *params = struct.unpack_from("<Ii7i", raw, 0)
print(f"magic {magic:#x} = 'ak42' in ASCII, stored little-endian (the bytes read '24ka'), "
      f"version {version}")
print(dict(zip(["dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                "seq_len"], params)))
print("shared classifier:", raw[36], " group size:", struct.unpack_from("<i", raw, 37)[0])

# %% [markdown]
# ## 4.2 Where the bytes go
#
# Every offset follows from the header. Here is the v1 layout of our model; the test suite
# builds reference files the same way, from the published description alone, and compares
# them with ours byte for byte.

# %%
args, ver, shared, gs, header = read_header(files[1])
offset, rows = header, []
for name in _tensor_order(1, args.n_layers, shared):
    n = _nbytes(name, args, 1, 0)
    rows.append((name, offset, n))
    offset += n
print(f"{'tensor':24} {'offset':>10} {'bytes':>10}")
for name, off, n in rows[:4] + rows[8:12] + rows[-2:]:
    print(f"{name:24} {off:>10,} {n:>10,}")
assert offset == files[1].stat().st_size

groups = {}
for name, _, n in rows:
    key = name.split(".")[-1]
    groups[key] = groups.get(key, 0) + n
fig, ax = plt.subplots(figsize=(7, 1.8))
left = 0
for (key, n), color in zip(groups.items(), plt.cm.tab20.colors):
    ax.barh(0, n, left=left, color=color, label=key)
    left += n
ax.set_yticks([])
ax.set_xlabel("bytes")
ax.legend(ncol=6, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.6))
ax.set_title("v1 file: where the bytes go")
plt.show()

# %% [markdown]
# The fp32 round trip is exact: every array read back equals the PyTorch parameter bit for bit.

# %%
_, w = read_model(files[0])
sd = model.state_dict()
assert np.array_equal(w["tok_embeddings"], sd["tok_embeddings.weight"].numpy())
assert np.array_equal(w["layers.3.w2"], sd["layers.3.feed_forward.w2.weight"].numpy())
print(type(w["layers.3.w2"].base).__name__, w["layers.3.w2"].shape, w["layers.3.w2"].dtype)

# %% [markdown]
# ## 4.3 Q8_0: int8 weights in groups
#
# v2 stores each matrix as int8, four times smaller. Each group of `gs` consecutive values gets
# its own scale `s = max|w| / 127`; a weight is stored as `round(w / s)` in [-127, 127] and read
# back as `q · s`. The error of each weight is at most half a step, `s / 2` — small where a group
# holds small numbers, which is why the groups are short. The group size starts at 64 and is
# halved until it divides both `dim` and `hidden_dim`, so no group straddles two rows.

# %%
def quantize_q80_naive(w: np.ndarray, gs: int):
    g = w.reshape(-1, gs)
    s = np.abs(g).max(axis=1) / 127
    q = np.round(g / s[:, None]).astype(np.int8)
    return q, s


# NBVAL_IGNORE_OUTPUT  (the numbers depend on the trained weights)
wq = sd["layers.0.attention.wq.weight"].numpy()
q, s, maxerr = quantize_q80(wq, 64)
q_naive, s_naive = quantize_q80_naive(wq, 64)
assert np.array_equal(q.reshape(-1, 64), q_naive) and np.allclose(s, s_naive)
err = np.abs(q.reshape(-1, 64) * s[:, None] - wq.reshape(-1, 64))
print(f"layer 0 wq: max error {maxerr:.2e}, max scale/2 {s.max() / 2:.2e}")
assert (err <= s[:, None] / 2 + 1e-8).all()

# NBVAL_IGNORE_OUTPUT
_, w2 = read_model(files[2])
deq = dequantized(w2)
group_err = np.concatenate([
    np.abs(deq[k] - w[k]).reshape(-1, w2.group_size).max(1) for k in w if w[k].ndim == 2])
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.hist(group_err, bins=60)
ax.set_xlabel("max |error| within a group")
ax.set_ylabel("groups")
ax.set_title(f"Q8_0 with group size {w2.group_size}: every matrix of the model")
plt.show()
print(f"{len(group_err):,} groups, worst {group_err.max():.1e}")

# %% [markdown]
# What does int8 do to the model's predictions? We run the same 128 tokens through the fp32 and
# the int8 file with chapter 5's NumPy engine and compare the logits and the greedy choices.

# %%
# NBVAL_IGNORE_OUTPUT
f32, i8 = NumpyLlama.load(files[0]), NumpyLlama.load(files[2])
tokens = np.random.default_rng(0).integers(3, args.vocab_size, 128).tolist()
a, b = f32.forward_tokens(tokens, 0), i8.forward_tokens(tokens, 0)
agree = (a.argmax(-1) == b.argmax(-1)).mean()
print(f"max |Δlogit| = {np.abs(a - b).max():.2f} (logits span {a.min():.0f}..{a.max():.0f}); "
      f"greedy choices agree at {agree:.0%} of positions")
assert agree > 0.9

# %% [markdown]
# Hugging Face users get `config.json` + `model.safetensors` from the same checkpoint:
# `babyllama export out/book/ckpt.pt --hf out/hf` (chapter 2 showed the round trip).
