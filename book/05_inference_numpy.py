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
# # Chapter 5 — Inference in pure NumPy
#
# Training needs autograd; inference does not. Given the weights from chapter 4's file, one
# token's forward pass is a few dozen lines of array math: look up the embedding, and for each
# layer normalise, project to q/k/v, rotate q and k, attend over the KV cache, project back, add;
# normalise, feed forward, add. This chapter writes that out, checks it against PyTorch, then
# adds llama2.c's sampler. The library version is `babyllama.inference_numpy.NumpyLlama`: it
# never imports torch.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from babyllama import book
from babyllama.export import read_model
from babyllama.inference_numpy import NumpyLlama, XorShiftRng, sample
from babyllama.model import Transformer
from babyllama.tokenizer import Tokenizer

paths = book.Paths.find()
files = book.ensure_exports(paths)
tok = Tokenizer.from_bin(paths.tok_bin)
args, w = read_model(files[0])
print(args)

# %% [markdown]
# ## 5.1 The forward pass, as plain array math
#
# `w` maps names to arrays (`layers.0.wq` has shape `(dim, dim)`, as `nn.Linear` stores it, so a
# projection is `W @ x`). The KV cache holds, per layer, the keys and values of every position
# seen so far.

# %%
def rmsnorm_naive(x, weight, eps=1e-5):
    return weight * (x / np.sqrt(np.mean(x * x) + eps))


def softmax_naive(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def forward_naive(token, pos, cache, keep_attention=None):
    hd = args.head_dim
    kv_mul = args.n_heads // args.n_kv_heads
    x = w["tok_embeddings"][token].astype(np.float64)
    freqs = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(pos * freqs), np.sin(pos * freqs)
    for l in range(args.n_layers):
        L = {k.split(".")[-1]: v for k, v in w.items() if k.startswith(f"layers.{l}.")}.get
        xb = rmsnorm_naive(x, L("attention_norm"))
        q = (L("wq") @ xb).reshape(args.n_heads, hd)
        k = (L("wk") @ xb).reshape(args.n_kv_heads, hd)
        v = (L("wv") @ xb).reshape(args.n_kv_heads, hd)
        for t in (q, k):   # RoPE: rotate each pair (2i, 2i+1)
            a, b = t[:, 0::2].copy(), t[:, 1::2].copy()
            t[:, 0::2], t[:, 1::2] = a * cos - b * sin, a * sin + b * cos
        cache[l]["k"].append(k)
        cache[l]["v"].append(v)
        K, V = np.stack(cache[l]["k"]), np.stack(cache[l]["v"])   # (pos+1, n_kv_heads, hd)
        out = np.empty((args.n_heads, hd))
        for h in range(args.n_heads):   # head h reads KV head h // kv_mul
            att = softmax_naive(K[:, h // kv_mul] @ q[h] / np.sqrt(hd))
            if keep_attention is not None:
                keep_attention[l, h, pos, : pos + 1] = att
            out[h] = att @ V[:, h // kv_mul]
        x = x + L("wo") @ out.reshape(-1)
        xb = rmsnorm_naive(x, L("ffn_norm"))
        h1, h3 = L("w1") @ xb, L("w3") @ xb
        x = x + L("w2") @ (h1 / (1 + np.exp(-h1)) * h3)   # SwiGLU
    return w["output"] @ rmsnorm_naive(x, w["norm"])


prompt = tok.encode("Once upon a time, there was a little cat named", bos=True)
cache = [{"k": [], "v": []} for _ in range(args.n_layers)]
T = len(prompt)
attention = np.zeros((args.n_layers, args.n_heads, T, T))
ours = np.stack([forward_naive(t, i, cache, attention) for i, t in enumerate(prompt)])
print("logits:", ours.shape)

# %% [markdown]
# Three independent implementations of the same function: our cell, the library's engine, and
# chapter 2's PyTorch model. They must agree at every position to 1e-5.

# %%
engine = NumpyLlama.load(files[0])
lib = np.stack([engine.forward(t, i) for i, t in enumerate(prompt)])
model = Transformer.from_pretrained(paths.ckpt).eval()
with torch.no_grad():
    ref = model(torch.tensor([prompt]))[0][0].numpy()
print("naive vs library:", np.abs(ours - lib).max() < 1e-5,
      "| library vs PyTorch:", np.abs(lib - ref).max() < 1e-5)
assert np.abs(ours - lib).max() < 1e-5 and np.abs(lib - ref).max() < 1e-5

# %% [markdown]
# The library also has `forward_tokens`, which takes the whole prompt at once (matrix–matrix
# products instead of matrix–vector), the fast way to process a prompt:

# %%
engine.reset()
batched = engine.forward_tokens(prompt, 0)
assert np.abs(batched - lib).max() < 1e-5

# %% [markdown]
# ## 5.2 What the model looks at
#
# The attention weights we kept: row *t* of each map is where token *t* looked. Early layers
# look mostly at the previous few tokens; later heads reach back to the name and the subject.

# %%
# NBVAL_IGNORE_OUTPUT  (the figures depend on the trained weights)
labels = [tok.decode([p]).strip() or "·" for p in prompt]
labels[0] = "<s>"
fig, axes = plt.subplots(1, args.n_layers, figsize=(3.2 * args.n_layers, 3.4))
for l, ax in enumerate(axes):
    ax.imshow(attention[l, 0], cmap="viridis", vmin=0, vmax=1)
    ax.set_title(f"layer {l}, head 0")
    ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(T), labels, fontsize=7)
fig.tight_layout()
plt.show()

# %%
# NBVAL_IGNORE_OUTPUT
probs = np.exp(ours[-1] - ours[-1].max())
probs /= probs.sum()
top = np.argsort(-probs)[:10]
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.bar([repr(tok.decode([int(i)])) for i in top], probs[top])
ax.set_title(f"next token after {tok.decode(prompt)!r}")
ax.tick_params(axis="x", rotation=45)
plt.show()
assert any(tok.decode([int(i)]).strip()[:1].isupper() for i in top)   # names are likely

# %% [markdown]
# ## 5.3 Sampling, exactly as run.c does it
#
# At temperature 0, take the argmax. Otherwise divide the logits by the temperature, softmax,
# and draw with a uniform random number ("coin"). **Top-p** sampling first keeps only the
# smallest set of most likely tokens whose probabilities add up to more than *p*, then draws
# within it. The random numbers come from run.c's **xorshift64\*** generator, written out here,
# so that the C engine of chapter 6 can draw the very same tokens from the same seed.

# %%
def random_u32_naive(state: int) -> tuple[int, int]:
    mask = (1 << 64) - 1
    state ^= state >> 12
    state ^= (state << 25) & mask
    state ^= state >> 27
    return ((state * 0x2545F4914F6CDD1D) & mask) >> 32, state


state, rng = 42, XorShiftRng(42)
draws = []
for _ in range(5):
    r, state = random_u32_naive(state)
    draws.append(r)
print(draws)
assert draws == [rng.u32() for _ in range(5)]

rng = XorShiftRng(7)
logits = np.array([3.0, 2.0, 1.0, 0.0, -5.0], dtype=np.float32)
counts = np.bincount([sample(logits, 1.0, 0.9, rng) for _ in range(10_000)], minlength=5)
print("top-p 0.9 draws per token:", counts.tolist())
assert counts[3] == counts[4] == 0   # outside the nucleus: never drawn

# %% [markdown]
# ## 5.4 Generation
#
# `engine.generate(prompt, steps, temperature, topp, seed)` yields token ids; chapter 1's
# tokenizer turns them into text as they come (`babyllama generate ... --engine numpy`).

# %%
# NBVAL_IGNORE_OUTPUT
engine = NumpyLlama.load(files[0])
start = tok.encode("Once upon a time", bos=True)
pieces = list(tok.stream(engine.generate(start, 200, temperature=0.8, topp=0.9, seed=42),
                         prev=start[-1]))
print("Once upon a time" + "".join(pieces))

# %% [markdown]
# How fast? Tokens per second for the NumPy engine and for PyTorch (with its KV cache), on the
# book model, one token at a time:

# %%
# NBVAL_IGNORE_OUTPUT
def tokens_per_second(fn, n=100):
    t0 = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - t0)


def numpy_steps(n):
    engine.reset()
    for pos in range(n):
        engine.forward(5, pos)


@torch.inference_mode()
def torch_steps(n):
    model.reset_cache()
    for pos in range(n):
        model(torch.tensor([[5]]), start_pos=pos, use_cache=True)


print(f"{'engine':8} {'tok/s':>8}")
for name, fn in (("numpy", numpy_steps), ("pytorch", torch_steps)):
    print(f"{name:8} {tokens_per_second(fn):8.0f}")
