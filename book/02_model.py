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
# every token of the vocabulary. We write each piece in a few lines, check it against the
# library's `babyllama.model` (which the rest of the book uses), then assemble the model and
# give it a KV cache for fast generation.

# %%
import math
import tempfile

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
diff = (norm(x) - rmsnorm_naive(x, norm.weight)).abs().max().item()
print(f"max |ours - library| = {diff:.1e}  (bound 1e-6)")
assert diff <= 1e-6
print("rms after norm:", norm(x).pow(2).mean(-1).sqrt()[0].detach().numpy().round(3))

# %% [markdown]
# ## 2.2 Rotary position embeddings (RoPE)
#
# Attention compares a query with keys by a dot product, which by itself knows nothing about
# order. RoPE writes the position into q and k by *rotating* them. Split a head's `head_dim`
# channels into pairs `(x[0], x[1]), (x[2], x[3]), …` — interleaved neighbours, as Meta and
# llama2.c do — and turn pair `i` of the vector at position `pos` by the angle
#
# `angle[pos, i] = pos · θ_i`,  with  `θ_i = 10000^(−2i / head_dim)`.
#
# Rotating q by `m·θ` and k by `n·θ` changes their dot product exactly as rotating one of them
# by `(m − n)·θ` would: the score depends on how far apart the two tokens are, not on where they
# are. Pair 0 turns by 1 radian per token, the last pair almost not at all, so together they
# measure distances from one token to thousands. First the table of angles:

# %%
def rope_angles_naive(head_dim: int, n_pos: int, theta: float = 10000.0) -> torch.Tensor:
    """angle[pos, i] = pos * theta^(-2i/head_dim): (n_pos, head_dim/2)."""
    angles = torch.zeros(n_pos, head_dim // 2, dtype=torch.float64)
    for pos in range(n_pos):
        for i in range(head_dim // 2):
            angles[pos, i] = pos * theta ** (-2 * i / head_dim)
    return angles


angles = rope_angles_naive(head_dim=16, n_pos=64)
freqs_cos, freqs_sin = precompute_freqs_cis(head_dim=16, end=64)   # the library's float32 table
diff = max((angles.cos() - freqs_cos).abs().max().item(),
           (angles.sin() - freqs_sin).abs().max().item())
print(f"max |cos, sin: ours - library| = {diff:.1e}  (bound 1e-5: float32 angles up to 63 rad)")
assert diff <= 1e-5

fig, ax = plt.subplots(figsize=(6, 3))
im = ax.imshow(torch.remainder(angles, 2 * math.pi).T, aspect="auto", cmap="twilight",
               interpolation="nearest", origin="lower")
ax.set_xlabel("position")
ax.set_ylabel("channel pair i")
ax.set_title("rotation angle pos·θ_i (mod 2π)")
fig.colorbar(im, label="angle (radians)")
plt.show()

# %% [markdown]
# Then the rotation of each pair `(a, b)` by its angle φ: `(a cos φ − b sin φ, a sin φ + b cos φ)`.
# Seen as a complex number `a + ib`, that is a multiplication by `e^{iφ}` — how Meta's
# reference code writes it, which gives us a second, independent check. (The library's
# `apply_rotary_emb` multiplies complex numbers too: one kernel instead of four products and a
# stack, which makes a training step of the book's model ~5% cheaper.)

# %%
def rotate_pairs_naive(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, head_dim); cos/sin (T, head_dim/2): rotate every pair (x[2i], x[2i+1])."""
    a, b = x[..., 0::2], x[..., 1::2]               # the two coordinates of every pair
    c, s = cos[:, None, :], sin[:, None, :]         # the same angle for every head
    out = torch.empty_like(x)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out


xq = torch.randn(2, 64, 3, 16)                      # (batch, positions, heads, head_dim)
ours = rotate_pairs_naive(xq, freqs_cos, freqs_sin)
as_complex = torch.view_as_complex(xq.reshape(2, 64, 3, 8, 2)) * torch.polar(
    torch.ones(64, 8), angles.float())[:, None, :]
diffs = [(ours - apply_rotary_emb(xq, freqs_cos, freqs_sin)).abs().max().item(),
         (ours - torch.view_as_real(as_complex).flatten(-2)).abs().max().item()]
print(f"max |ours - library| = {diffs[0]:.1e}, max |ours - complex product| = {diffs[1]:.1e}"
      f"  (bound 1e-5)")
assert max(diffs) <= 1e-5

q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
def score(pq: int, pk: int) -> float:
    """q at position pq . k at position pk, both rotated."""
    rq = rotate_pairs_naive(q, freqs_cos[pq:pq + 1], freqs_sin[pq:pq + 1])
    rk = rotate_pairs_naive(k, freqs_cos[pk:pk + 1], freqs_sin[pk:pk + 1])
    return (rq * rk).sum().item()
print(f"score(5, 2) = {score(5, 2):.5f}   score(40, 37) = {score(40, 37):.5f}   "
      f"|difference| = {abs(score(5, 2) - score(40, 37)):.1e}  (bound 1e-4)")
assert abs(score(5, 2) - score(40, 37)) <= 1e-4

# %% [markdown]
# ## 2.3 Attention, with grouped-query heads
#
# Each head projects the tokens into queries, keys and values of size `head_dim`; a token's
# output is the softmax-weighted sum of the values of the tokens up to it (the causal mask).
#
# **Why divide the scores by √head_dim?** A score is a sum of `head_dim` products. If q's and
# k's entries have unit variance, the sum has variance `head_dim`: with 64 dimensions the
# scores spread over ±8 or more, and softmax of such numbers puts most of the weight on one
# key — and passes back almost no gradient to the others. Dividing by `√head_dim` brings the
# spread back to about 1, whatever the head size:

# %%
g = torch.Generator().manual_seed(0)
for hd in (16, 64, 256):
    qs, ks = torch.randn(1000, hd, generator=g), torch.randn(1000, 16, hd, generator=g)
    raw = (ks @ qs[:, :, None]).squeeze(-1)                 # 1000 queries x 16 keys
    top_raw = F.softmax(raw, -1).max(-1).values.mean().item()
    top_scaled = F.softmax(raw / math.sqrt(hd), -1).max(-1).values.mean().item()
    print(f"head_dim {hd:3d}: std of q·k {raw.std():5.1f}, of q·k/√head_dim "
          f"{(raw / math.sqrt(hd)).std():.2f};  largest softmax weight (16 keys) "
          f"{top_raw:.2f} unscaled, {top_scaled:.2f} scaled")
    assert abs((raw / math.sqrt(hd)).std().item() - 1) < 0.1   # scaled spread ~1, any head_dim

# %% [markdown]
# With **grouped-query attention** (GQA) several query heads share one key/value head, which
# shrinks the KV cache (section 2.6): here 8 query heads read 2 KV heads, 4 each — query head
# `h` reads KV head `h // 4`.

# %%
def attention_naive(q, k, v):
    """q (B, H, T, hd), k/v (B, H, T, hd): causal softmax attention, written out."""
    T = q.shape[2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)   # True above the diagonal
    return F.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v


def repeat_kv_naive(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, T, n_kv_heads, hd) -> (B, T, n_kv_heads * n_rep, hd): head h reads KV head h // n_rep."""
    return x[:, :, torch.arange(x.shape[2] * n_rep) // n_rep]


B, T, hd = 1, 6, args.head_dim
n_rep = args.n_heads // args.n_kv_heads
q = torch.randn(B, args.n_heads, T, hd)
k = torch.randn(B, T, args.n_kv_heads, hd)
v = torch.randn(B, T, args.n_kv_heads, hd)
assert torch.equal(repeat_kv_naive(k, n_rep), repeat_kv(k, n_rep))   # indexing: exact
k_rep = repeat_kv_naive(k, n_rep).transpose(1, 2)   # (B, H, T, hd)
v_rep = repeat_kv_naive(v, n_rep).transpose(1, 2)
fused = F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)
diff = (attention_naive(q, k_rep, v_rep) - fused).abs().max().item()
print("k:", tuple(k.shape), "-> shared across heads:", tuple(k_rep.shape))
print(f"max |ours - PyTorch's fused attention| = {diff:.1e}  (bound 1e-5)")
assert diff <= 1e-5

scores = (q @ k_rep.transpose(-2, -1) / math.sqrt(hd))[0, 0]
att = F.softmax(scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1),
                                   float("-inf")), -1)
fig, ax = plt.subplots(figsize=(3.8, 3))
im = ax.imshow(att, cmap="Blues", vmin=0, vmax=1)
ax.set_xlabel("key position")
ax.set_ylabel("query position")
ax.set_title("causal attention weights (head 0)")
fig.colorbar(im, label="softmax weight")
plt.show()

# %% [markdown]
# (Random q and k, so the pattern means nothing yet; the point is the shape: each row sums to
# 1 over the keys at or before the query, and everything above the diagonal is 0.)
#
# The library does not make the copies `k_rep` and `v_rep`: it passes the 2 KV heads to
# PyTorch's fused attention with `enable_gqa=True`, which reads KV head `h // n_rep` for query
# head `h` itself, and saves the copies and, in training, the sum of their gradients.
#
# ## 2.4 SwiGLU feed-forward
#
# `w2(silu(w1 x) * w3 x)`: a gated MLP. `w1` (the gate) and `w3` (the "up" projection) map
# `dim → hidden_dim`; their product, one gated by SiLU, is mapped back by `w2` (the "down"
# projection). With three matrices instead of two, `hidden_dim` is 2/3 of the usual 4·dim
# (rounded up to `multiple_of`) to keep the parameter count.

# %%
def feed_forward_naive(x, w1, w2, w3):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


model = Transformer(args).eval()
ff = model.layers[0].feed_forward
x = torch.randn(2, 5, args.dim)
diff = (ff(x) - feed_forward_naive(x, ff.w1.weight, ff.w2.weight, ff.w3.weight)).abs().max()
print(f"max |ours - library| = {diff.item():.1e}  (bound 1e-6)")
assert diff <= 1e-6
print("hidden_dim:", args.hidden_dim, " w1, w3:", tuple(ff.w1.weight.shape),
      " w2:", tuple(ff.w2.weight.shape))

# %% [markdown]
# ## 2.5 The whole model, and how it starts
#
# Every piece is written; the model is those pieces in order. Look up each token's embedding;
# in every layer, normalise, project to q, k and v, rotate q and k, attend (each query head
# reading its shared KV head), project back with `wo` and add; normalise, feed forward and
# add; then a final RMSNorm and the classifier, which is the embedding matrix again. Our
# pieces, assembled around a model's weights, against the library's `Transformer` (which
# chapter 3 trains):

# %%
def transformer_naive(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab_size) of `tokens` (B, T), from our pieces and the model's weights."""
    a = model.params
    B, T = tokens.shape
    cos, sin = model.freqs_cos[:T], model.freqs_sin[:T]
    x = model.tok_embeddings.weight[tokens]                                   # (B, T, dim)
    for layer in model.layers:
        att, ff = layer.attention, layer.feed_forward
        xn = rmsnorm_naive(x, layer.attention_norm.weight, a.norm_eps)
        q = (xn @ att.wq.weight.T).view(B, T, a.n_heads, a.head_dim)
        k = (xn @ att.wk.weight.T).view(B, T, a.n_kv_heads, a.head_dim)
        v = (xn @ att.wv.weight.T).view(B, T, a.n_kv_heads, a.head_dim)
        q, k = rotate_pairs_naive(q, cos, sin), rotate_pairs_naive(k, cos, sin)
        k = repeat_kv_naive(k, a.n_heads // a.n_kv_heads)
        v = repeat_kv_naive(v, a.n_heads // a.n_kv_heads)
        out = attention_naive(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = x + out.transpose(1, 2).reshape(B, T, a.dim) @ att.wo.weight.T    # (B, T, dim)
        hn = rmsnorm_naive(h, layer.ffn_norm.weight, a.norm_eps)
        x = h + feed_forward_naive(hn, ff.w1.weight, ff.w2.weight, ff.w3.weight)
    return rmsnorm_naive(x, model.norm.weight, a.norm_eps) @ model.output.weight.T


toks = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    diff = (transformer_naive(model, toks) - model(toks)[0]).abs().max().item()
print(f"our pieces assembled vs the library's Transformer: max |Δlogit| = {diff:.1e}  "
      f"(bound 1e-5)")
assert diff <= 1e-5

# %% [markdown]
# `Transformer.forward(tokens, targets)` returns logits for every position and, given targets,
# the cross-entropy loss. Every matrix starts as a draw from a normal distribution with std
# 0.02 (the RMSNorm gains start at 1), except two kinds, which get `0.02 / √(2·n_layers)`.
# The reason (from GPT-2): each of the `2·n_layers` sub-blocks *adds* its output to the
# residual stream, so at initialisation the stream's variance grows with every addition;
# shrinking what each one adds keeps the stream's scale independent of depth. The matrices to
# shrink are the ones that write into the stream: `wo` for attention and `w2` (the down
# projection) for the feed-forward.
#
# llama2.c's `model.py` — and this library, to start from the same weights — shrinks **`wo`
# and `w3`**. `w3` is the *up* projection, not the one that writes into the stream; but the
# feed-forward output is linear in `w3` just as in `w2`, so at initialisation shrinking either
# shrinks the block's contribution by the same factor (exercise 3 checks this). The measured
# spread of each kind of weight in a fresh model:

# %%
expect = {"wo": 0.02 / math.sqrt(2 * args.n_layers), "w3": 0.02 / math.sqrt(2 * args.n_layers)}
for kind in ("tok_embeddings", "wq", "wk", "wv", "wo", "w1", "w2", "w3"):
    w = torch.cat([p.flatten() for n, p in model.named_parameters() if f"{kind}.weight" in n])
    want = expect.get(kind, 0.02)
    print(f"{kind:15} std {w.std().item():.4f}  (drawn with {want:.4f})")
    assert abs(w.std().item() - want) < 0.05 * want

tokens = torch.randint(0, args.vocab_size, (4, 32))
logits, loss = model(tokens, targets=torch.randint(0, args.vocab_size, (4, 32)))
print("logits:", tuple(logits.shape), f" loss {loss.item():.2f} vs ln(512) = "
      f"{math.log(512):.2f}  (|difference| {abs(loss.item() - math.log(512)):.2f}, bound 0.1)")
assert abs(loss.item() - math.log(512)) < 0.1

# %% [markdown]
# Such a fresh model is a uniform guesser: its logits are all close to 0, so its loss is close
# to `ln(vocab_size)`. The presets the book uses, and the parameter counts that follow from
# their shapes:

# %%
print(f"{'preset':12} {'dim':>5} {'layers':>6} {'heads':>5} {'kv':>3} {'hidden':>6} "
      f"{'vocab':>6} {'seq':>5} {'params':>14}")
for name, a in PRESETS.items():
    n = count_params(a, shared_classifier=name != "llama2-7b")
    print(f"{name:12} {a.dim:5d} {a.n_layers:6d} {a.n_heads:5d} {a.n_kv_heads:3d} "
          f"{a.hidden_dim:6d} {a.vocab_size:6d} {a.max_seq_len:5d} {n:14,d}")

# %% [markdown]
# ## 2.6 The KV cache
#
# Generating text is one token at a time: to choose token *t + 1*, the model needs token *t*'s
# query and the keys and values of all tokens up to *t*. The keys and values of earlier tokens
# never change (a token only attends backwards), so we can keep them instead of recomputing.
#
# * **Without a cache**, step *t* reruns the model on all *t* tokens: *t* tokens' worth of
#   projections and feed-forward, plus attention over *t × t* pairs. Generating *T* tokens costs
#   *O(T²)* token passes (and *O(T³)* attention work) in total.
# * **With a cache**, step *t* runs the model on the one new token and attends over *t* cached
#   keys: a constant amount of projection work plus *O(t)* attention per step, so *O(T)* token
#   passes (and *O(T²)* attention) for *T* tokens.
#
# The price is memory: `2 · n_layers · max_seq_len · kv_dim` numbers per sequence, where
# `kv_dim = n_kv_heads · head_dim` (one key and one value per layer, position and KV channel)
# — which is what GQA's fewer KV heads shrink.
#
# Attention for one new token over the cache, written out for a single token vector:

# %%
def attention_step_naive(att, x, pos, cache_k, cache_v, cos, sin):
    """Token vector x (dim,) at position `pos` through attention layer `att`; fills the cache
    (max_seq_len, n_kv_heads, head_dim) at `pos` and attends over positions 0..pos."""
    n_heads, n_kv, hd = att.n_heads, att.n_kv_heads, att.head_dim
    q = (att.wq.weight @ x).view(1, 1, n_heads, hd)
    k = (att.wk.weight @ x).view(1, 1, n_kv, hd)
    q = rotate_pairs_naive(q, cos[pos:pos + 1], sin[pos:pos + 1])[0, 0]      # (n_heads, hd)
    cache_k[pos] = rotate_pairs_naive(k, cos[pos:pos + 1], sin[pos:pos + 1])[0, 0]
    cache_v[pos] = (att.wv.weight @ x).view(n_kv, hd)
    out = torch.empty(n_heads, hd)
    for h in range(n_heads):
        keys = cache_k[:pos + 1, h // (n_heads // n_kv)]                     # (pos + 1, hd)
        vals = cache_v[:pos + 1, h // (n_heads // n_kv)]
        weights = F.softmax(keys @ q[h] / math.sqrt(hd), dim=0)             # one per position
        out[h] = weights @ vals
    return att.wo.weight @ out.flatten()

# %% [markdown]
# Feed a sequence through it one token at a time and compare with the library's attention
# layer run on the whole sequence at once (which uses no cache, just the causal mask):

# %%
att = model.layers[0].attention
seq = torch.randn(1, args.max_seq_len, args.dim)
cache_k = torch.zeros(args.max_seq_len, args.n_kv_heads, args.head_dim)
cache_v = torch.zeros(args.max_seq_len, args.n_kv_heads, args.head_dim)
with torch.no_grad():
    whole = att(seq, model.freqs_cos, model.freqs_sin)[0]                 # (T, dim)
    stepped = torch.stack([attention_step_naive(att, seq[0, t], t, cache_k, cache_v,
                                                model.freqs_cos, model.freqs_sin)
                           for t in range(args.max_seq_len)])
diff = (stepped - whole).abs().max().item()
print(f"one token at a time over our cache vs the whole sequence: max |Δ| = {diff:.1e}  "
      f"(bound 1e-5)")
assert diff <= 1e-5

# %% [markdown]
# The library's model does the same with `use_cache=True`, for every layer at once. The check:
# feed a sequence one token at a time through the cache and compare with one full forward pass,
# at every position.

# %%
model.reset_cache()
x = torch.randint(0, args.vocab_size, (1, 32))
with torch.no_grad():
    full = model(x)[0]
    steps = [model(x[:, t:t + 1], start_pos=t, use_cache=True)[0] for t in range(32)]
diff = (torch.cat(steps, dim=1) - full).abs().max().item()
print(f"cached vs full recomputation, all 32 positions: max |Δlogit| = {diff:.1e}  (bound 1e-5)")
assert diff < 1e-5
kv_floats = 2 * args.n_layers * args.max_seq_len * args.n_kv_heads * args.head_dim
print(f"this model's KV cache: {kv_floats:,} floats; without GQA it would be "
      f"{kv_floats * n_rep:,}")

# %% [markdown]
# `model.generate(prompt, max_new_tokens, temperature, top_k, top_p, seed)` runs that loop and
# samples. Checkpoints: `Transformer.from_pretrained(path)` reads ours, a Hugging Face Llama
# directory or Meta's `params.json` + `consolidated.*.pth`, and `save_pretrained` writes the
# Hugging Face layout. Hugging Face rotates the two *halves* of each head instead of
# interleaved pairs, so `wq` and `wk` are permuted on the way; the tests prove the round trip
# against `transformers.LlamaForCausalLM` to 1e-4.

# %%
with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    back = Transformer.from_pretrained(d).eval()
with torch.no_grad():
    assert torch.equal(back(x)[0], model(x)[0])
print("saved and reloaded: identical logits")
print("greedy continuation of [1, 42] by the untrained model:",
      model.generate([1, 42], max_new_tokens=8, temperature=0.0))
with torch.no_grad():
    echo = (model(x)[0][0].argmax(-1) == x[0]).float().mean().item()
print(f"positions where the untrained model's top score is the input token itself: {echo:.0%}")

# %% [markdown]
# An untrained model echoes its input. Its blocks add only small numbers to the residual
# stream (the small init above), so the last hidden state is still, in direction, the
# embedding of the current token; and because the classifier *is* the embedding matrix, the
# highest score goes to the token whose embedding points the same way — that token itself
# (`e·e` is large, `e·e'` for two random embeddings is near 0). Chapter 3 trains it out of
# this.
#
# ## Exercises
#
# 1. **Rotations keep lengths.** Check that `rotate_pairs_naive` leaves the length of every
#    head vector unchanged at every position, and explain why that means RoPE changes *which*
#    keys a query prefers but not the overall scale of the scores.
# 2. **Softmax without the scale.** For `head_dim = 64`, random unit-variance q and 16 random
#    keys, measure the average entropy of the attention weights with and without dividing by
#    `√head_dim`, and compare both with the entropy of uniform weights, `ln 16`.
# 3. **w2 or w3?** In a fresh model, compare the spread of what the feed-forward block adds to
#    the residual stream when `w3` is shrunk (llama2.c's init) and when `w2` is shrunk instead.
# 4. **KV-cache size.** How many bytes does the fp32 KV cache of `stories15M` take at its full
#    context of 256 tokens? And of Llama 2 7B at 4,096 tokens — and if it used 8 KV heads
#    instead of 32?
#
# Solutions: `tests/test_exercises.py`.
