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
# # Chapter 2 — Llama 2 in PyTorch
#
# A Llama 2 model is a stack of identical blocks. Each block reads the residual stream `x`
# (one vector of size `dim` per token) and adds two things to it:
#
# ```
# h   = x + Attention(RMSNorm(x))        # tokens look at earlier tokens
# out = h + FeedForward(RMSNorm(h))      # each token thinks on its own
# ```
#
# Around the stack: an embedding table turns token ids into vectors, a final RMSNorm and a
# classifier (the same matrix as the embedding, "tied") turn vectors back into a score for
# every token of the vocabulary. We build each piece, check its shapes and numbers, then use
# the library's `babyllama.model.Transformer`.

# %%
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from babyllama.model import (
    PRESETS,
    ModelArgs,
    RMSNorm,
    Transformer,
    apply_rotary_emb,
    count_params,
    precompute_freqs_cis,
    repeat_kv,
)

torch.manual_seed(0)
args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, max_seq_len=32)
print(args)

# %% [markdown]
# ## 2.1 RMSNorm
#
# LayerNorm subtracts the mean and divides by the standard deviation. Llama drops the mean:
# divide each vector by its root-mean-square, then scale each channel by a learned weight.

# %%
def rmsnorm_naive(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


x = torch.randn(2, 5, args.dim)       # (batch, tokens, dim)
norm = RMSNorm(args.dim, args.norm_eps)
assert torch.allclose(norm(x), rmsnorm_naive(x, norm.weight), atol=1e-6)
print("rms after norm:", norm(x).pow(2).mean(-1).sqrt()[0].detach().numpy().round(3))

# %% [markdown]
# ## 2.2 Rotary position embeddings (RoPE)
#
# Attention compares a query with keys by a dot product, which by itself knows nothing about
# order. RoPE rotates each pair of channels `(x[2i], x[2i+1])` of q and k by an angle
# `pos · θ_i`, with `θ_i = 10000^(-2i/head_dim)`. The dot product of two rotated vectors
# depends only on the *difference* of their positions. Early pairs spin fast, late pairs slowly:

# %%
freqs_cos, freqs_sin = precompute_freqs_cis(head_dim=16, end=64)
angles = torch.atan2(freqs_sin, freqs_cos)
fig, ax = plt.subplots(figsize=(6, 3))
im = ax.imshow(angles.T, aspect="auto", cmap="twilight", interpolation="nearest")
ax.set_xlabel("position")
ax.set_ylabel("channel pair i")
ax.set_title("rotation angle pos·θ_i (mod 2π)")
fig.colorbar(im)
plt.show()

q = torch.randn(1, 1, 1, 16)
k = torch.randn(1, 1, 1, 16)
def score(pq, pk):
    cq, sq = freqs_cos[pq:pq + 1], freqs_sin[pq:pq + 1]
    ck, sk = freqs_cos[pk:pk + 1], freqs_sin[pk:pk + 1]
    return (apply_rotary_emb(q, cq, sq) * apply_rotary_emb(k, ck, sk)).sum().item()
print(f"score(5, 2) = {score(5, 2):.5f}   score(40, 37) = {score(40, 37):.5f}")
assert math.isclose(score(5, 2), score(40, 37), rel_tol=1e-4, abs_tol=1e-5)

# %% [markdown]
# ## 2.3 Attention, with grouped-query heads
#
# Each head projects the tokens into queries, keys and values of size `head_dim`; a token's
# output is the softmax-weighted sum of the values of the tokens before it (the causal mask).
# With **grouped-query attention** several query heads share one key/value head, which shrinks
# the KV cache: here 8 query heads read 2 KV heads, 4 each (`repeat_kv`).

# %%
def attention_naive(q, k, v):
    """q (B, H, T, hd), k/v (B, H, T, hd): causal softmax attention, written out."""
    T = q.shape[2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    return F.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v


B, T, hd = 1, 6, args.head_dim
q = torch.randn(B, args.n_heads, T, hd)
k = torch.randn(B, T, args.n_kv_heads, hd)
v = torch.randn(B, T, args.n_kv_heads, hd)
k_rep = repeat_kv(k, args.n_heads // args.n_kv_heads).transpose(1, 2)   # (B, H, T, hd)
v_rep = repeat_kv(v, args.n_heads // args.n_kv_heads).transpose(1, 2)
fused = F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)
assert torch.allclose(attention_naive(q, k_rep, v_rep), fused, atol=1e-5)
print("k:", tuple(k.shape), "-> shared across heads:", tuple(k_rep.shape))

scores = (q @ k_rep.transpose(-2, -1) / math.sqrt(hd))[0, 0]
att = F.softmax(scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1),
                                   float("-inf")), -1)
fig, ax = plt.subplots(figsize=(3.2, 3))
ax.imshow(att, cmap="Blues")
ax.set_xlabel("key position")
ax.set_ylabel("query position")
ax.set_title("causal attention (head 0)")
plt.show()

# %% [markdown]
# ## 2.4 SwiGLU feed-forward
#
# `w2(silu(w1 x) * w3 x)`: a gated MLP. With three matrices instead of two, `hidden_dim` is
# 2/3 of the usual 4·dim (rounded up to `multiple_of`) to keep the parameter count.

# %%
def feed_forward_naive(x, w1, w2, w3):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


model = Transformer(args).eval()
ff = model.layers[0].feed_forward
x = torch.randn(2, 5, args.dim)
assert torch.allclose(ff(x), feed_forward_naive(x, ff.w1.weight, ff.w2.weight, ff.w3.weight),
                      atol=1e-6)
print("hidden_dim:", args.hidden_dim, " w1:", tuple(ff.w1.weight.shape),
      " w2:", tuple(ff.w2.weight.shape))

# %% [markdown]
# ## 2.5 The whole model
#
# `Transformer.forward(tokens, targets)` returns logits for every position and, given targets,
# the cross-entropy loss. Freshly initialised (normal, std 0.02; the residual projections `wo`
# and `w3` scaled down by `sqrt(2·n_layers)`), it is a uniform guesser: its loss is close to
# `ln(vocab_size)`.

# %%
tokens = torch.randint(0, args.vocab_size, (4, 32))
logits, loss = model(tokens, targets=torch.randint(0, args.vocab_size, (4, 32)))
print("logits:", tuple(logits.shape), f" loss {loss.item():.2f} vs ln(512) = {math.log(512):.2f}")
assert abs(loss.item() - math.log(512)) < 0.1

print(f"{'preset':12} {'dim':>5} {'layers':>6} {'heads':>5} {'kv':>3} {'hidden':>6} "
      f"{'vocab':>6} {'seq':>5} {'params':>14}")
for name, a in PRESETS.items():
    n = count_params(a, shared_classifier=name != "llama2-7b")
    print(f"{name:12} {a.dim:5d} {a.n_layers:6d} {a.n_heads:5d} {a.n_kv_heads:3d} "
          f"{a.hidden_dim:6d} {a.vocab_size:6d} {a.max_seq_len:5d} {n:14,d}")

# %% [markdown]
# ## 2.6 The KV cache
#
# Generating token *t* only needs token *t*'s query, but the keys and values of all earlier
# tokens. Recomputing them every step costs *O(T²)*; keeping them in a cache makes each step
# *O(T)*. The check: feed a sequence one token at a time through the cache and compare with one
# full forward pass, at every position.

# %%
model.reset_cache()
x = torch.randint(0, args.vocab_size, (1, 32))
with torch.no_grad():
    full = model(x)[0]
    steps = [model(x[:, t:t + 1], start_pos=t, use_cache=True)[0] for t in range(32)]
diff = (torch.cat(steps, dim=1) - full).abs().max().item()
print("cached == full recomputation at every position (max |Δlogit| < 1e-5):", diff < 1e-5)
assert diff < 1e-5

# %% [markdown]
# `model.generate(prompt, max_new_tokens, temperature, top_k, top_p, seed)` runs that loop and
# samples. Checkpoints: `Transformer.from_pretrained(path)` reads ours, a Hugging Face Llama
# directory or Meta's `params.json` + `consolidated.*.pth`, and `save_pretrained` writes the
# Hugging Face layout. Hugging Face rotates the two *halves* of each head instead of
# interleaved pairs, so `wq` and `wk` are permuted on the way; the tests prove the round trip
# against `transformers.LlamaForCausalLM` to 1e-4.

# %%
import tempfile

with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    back = Transformer.from_pretrained(d).eval()
with torch.no_grad():
    assert torch.equal(back(x)[0], model(x)[0])
print(model.generate([1, 42], max_new_tokens=8, temperature=0.0))
