"""Chapter 05: Llama 2 inference in NumPy only, the way llama2.c's run.c does it.

    from babyllama.inference_numpy import NumpyLlama
    engine = NumpyLlama.load("out/model.bin")          # v0, v1 or v2 (int8 Q8_0)
    logits = engine.forward(token=1, pos=0)            # (vocab_size,) float32, fills the KV cache
    for t in engine.generate([1, 403], steps=64, temperature=0.8, topp=0.9, seed=42): ...

    babyllama generate out/model.bin -z out/tok512.bin -i "Once upon" --engine numpy

No torch anywhere on this path. The sampler (argmax, temperature, top-p, and the xorshift random
generator) is run.c's, step for step, so the C kernel of chapter 06 draws the same tokens from
the same seed. For v2 files, activations are quantized to int8 before each matmul as in runq.c,
so a v2 file means the same numbers here and in C. Past max_seq_len, generate shifts the
context (babyllama.context: keep n_keep tokens, drop the oldest half of the rest, recompute).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from babyllama.config import ModelArgs
from babyllama.context import Context, check_generate_args
from babyllama.export import Weights, read_model
from babyllama.tokenizer import BOS, EOS

F32 = np.float32


class NonFiniteError(ValueError):
    """The model produced NaN or infinite logits: there is no distribution to sample from."""


# ----------------------------------------------------------------------------------------------
# the building blocks, each as plain array math

# The small ops compute in float64 and return float32, as the C kernel does: both land on the
# same float32 values, which keeps int8 (v2) results equal after each activation is quantized.

def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    x64 = x.astype(np.float64)
    scale = 1.0 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    return (weight * (scale * x64)).astype(F32)


def softmax(x: np.ndarray) -> np.ndarray:
    """softmax over the last axis, in float64 (callers cast)."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return x64 / (1.0 + np.exp(-x64))


def rope_tables(head_dim: int, seq_len: int, theta: float = 10000.0
                ) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of pos * theta^(-2i/head_dim), each (seq_len, head_dim/2), float64."""
    freqs = 1.0 / np.power(theta, np.arange(0, head_dim, 2) / head_dim)
    angles = np.arange(seq_len)[:, None] * freqs[None, :]
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate interleaved pairs of x (..., n_heads, head_dim); cos, sin (..., 1, head_dim/2)."""
    xr, xi = x[..., 0::2].astype(np.float64), x[..., 1::2].astype(np.float64)
    out = np.empty_like(x)
    out[..., 0::2] = xr * cos - xi * sin
    out[..., 1::2] = xr * sin + xi * cos
    return out


def quantize_rows(x: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """runq.c's activation quantization: scale = max|x|/127 per group, round half away from 0."""
    g = x.reshape(*x.shape[:-1], -1, group_size)
    scale = (np.abs(g).max(axis=-1) / F32(127.0)).astype(F32)
    safe = np.where(scale == 0, F32(1.0), scale)
    # a NaN or infinite scale quantizes to zeros (as in C); the scale carries it into the product
    with np.errstate(invalid="ignore"):
        v = np.where(np.isfinite(scale)[..., None], g / safe[..., None], 0).astype(np.float64)
    # clipped like C: a subnormal max|x| can round to a scale below max|x|/127 (int8 would wrap)
    q = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -127, 127).astype(np.int8)
    return q.reshape(x.shape), scale


def matmul_q80(x: np.ndarray, w: np.ndarray, ws: np.ndarray, group_size: int) -> np.ndarray:
    """x (T, n) fp32 @ W^T, W (d, n) int8 with per-group scales ws: quantize x, take exact
    integer dot products per group, then sum scale-weighted groups in order, as runq.c does."""
    d, n = w.shape
    G = n // group_size
    xq, xs = quantize_rows(x, group_size)                         # (T, n) int8, (T, G)
    wf = w.reshape(d, G, group_size).astype(F32)                  # int8 -> fp32 on the fly
    xf = xq.reshape(-1, G, group_size).astype(F32)
    # |sum| <= 127*127*group_size < 2^24: exact in fp32 whatever order BLAS adds in
    ival = np.einsum("dgk,tgk->tdg", wf, xf, optimize=True)      # (T, d, G)
    terms = (ival * ws.reshape(d, G)[None]) * xs[:, None, :]
    return np.cumsum(terms, axis=-1, dtype=F32)[..., -1]         # sequential, like the C loop


# ----------------------------------------------------------------------------------------------
# run.c's sampler

class XorShiftRng:
    """run.c's random_u32/random_f32: xorshift64* with the state kept to 64 bits."""

    MASK = (1 << 64) - 1

    def __init__(self, seed: int):
        if not 0 < seed <= self.MASK:
            raise ValueError(f"seed must be in [1, 2^64), got {seed} (0 would repeat forever)")
        self.state = seed

    def u32(self) -> int:
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & self.MASK
        s ^= s >> 27
        self.state = s
        return ((s * 0x2545F4914F6CDD1D) & self.MASK) >> 32

    def f32(self) -> float:   # in [0, 1), exactly a float32
        return float(F32(self.u32() >> 8) / F32(16777216.0))


def sample_topp(probs: np.ndarray, topp: float, coin: float) -> int:
    """Nucleus sampling: the smallest set of most likely tokens whose mass exceeds topp."""
    n = probs.size
    if n == 1:
        return 0
    cutoff = F32((1.0 - topp) / (n - 1))   # tokens below this can never be in the nucleus
    idx = np.nonzero(probs >= cutoff)[0]
    if idx.size == 0:   # then topp < 1/n <= the top probability: the top token is the nucleus
        return int(np.argmax(probs))
    idx = idx[np.argsort(-probs[idx], kind="stable")]   # ties: lower id first (as our C does)
    cum = np.cumsum(probs[idx], dtype=F32)
    over = np.nonzero(cum > F32(topp))[0]
    last = over[0] if over.size else idx.size - 1
    r = F32(coin) * cum[last]
    hit = np.nonzero(r < cum[:last + 1])[0]
    return int(idx[hit[0]] if hit.size else idx[last])


def sample(logits: np.ndarray, temperature: float, topp: float, rng: XorShiftRng) -> int:
    bad = np.flatnonzero(~np.isfinite(logits))
    if bad.size:
        raise NonFiniteError(f"logit of token {bad[0]} is {logits[bad[0]]}, not finite: NaN or "
                             f"infinite weights or activations")
    if temperature == 0.0 or overflows(logits, temperature):
        return int(np.argmax(logits))
    probs = softmax((logits / F32(temperature)).astype(np.float64)).astype(F32)
    coin = rng.f32()
    if topp <= 0 or topp >= 1:
        hit = np.nonzero(F32(coin) < np.cumsum(probs, dtype=F32))[0]
        return int(hit[0]) if hit.size else probs.size - 1
    return sample_topp(probs, topp, coin)


def overflows(logits: np.ndarray, temperature: float) -> bool:
    """Does logits / temperature overflow float32? Then sampling is greedy, its limit."""
    with np.errstate(over="ignore", divide="ignore"):
        return not np.isfinite(F32(np.abs(logits).max()) / F32(temperature))


def sample_at(engine, logits: np.ndarray, pos: int, temperature: float, topp: float,
              rng: XorShiftRng) -> int:
    """engine.sample of the logits computed at position `pos`, naming it in an error."""
    try:
        return engine.sample(logits, temperature, topp, rng)
    except NonFiniteError as e:
        raise NonFiniteError(f"the logits at position {pos}: {e}") from None


def check_sampling(temperature: float, topp: float) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < topp <= 1:
        raise ValueError(f"topp must be in (0, 1], got {topp}")


def random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") or 1


# ----------------------------------------------------------------------------------------------
# the engine

class NumpyLlama:
    def __init__(self, args: ModelArgs, w: Weights):
        self.args, self.w = args, w
        self.gs = w.group_size
        if w.version == 2:   # runq.c keeps a dequantized copy of the embedding table
            emb = w["tok_embeddings"].reshape(-1, self.gs).astype(F32)
            self.emb = (emb * w["tok_embeddings.scale"][:, None]).reshape(w["tok_embeddings"].shape)
        else:
            self.emb = w["tok_embeddings"]
        self.cos, self.sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        kv_dim = args.n_kv_heads * args.head_dim
        self.key_cache = np.zeros((args.n_layers, args.max_seq_len, kv_dim), dtype=F32)
        self.value_cache = np.zeros_like(self.key_cache)

    @classmethod
    def load(cls, path: str | Path) -> NumpyLlama:
        return cls(*read_model(path))

    def reset(self) -> None:
        self.key_cache[:] = 0
        self.value_cache[:] = 0

    sample = staticmethod(sample)   # run.c's sampler; CLlama brings the C one

    def matmul(self, x: np.ndarray, name: str) -> np.ndarray:
        """x (T, n) @ W^T for W (d, n) named `name`, fp32 or Q8_0."""
        w = self.w[name]
        if w.dtype == np.int8:
            return matmul_q80(x, w, self.w[name + ".scale"], self.gs)
        return x @ w.T

    def forward_tokens(self, tokens: list[int], pos: int) -> np.ndarray:
        """Logits (T, vocab) of tokens at positions pos .. pos+T-1, all at once (matrix-matrix)."""
        a, T = self.args, len(tokens)
        if T == 0:
            raise ValueError("at least one token is needed (got an empty list)")
        if pos < 0 or pos + T > a.max_seq_len:
            raise ValueError(f"positions {pos}..{pos + T - 1} are outside the context "
                             f"[0, {a.max_seq_len})")
        bad = [t for t in tokens if not 0 <= t < a.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary [0, {a.vocab_size})")
        hd, n_rep = a.head_dim, a.n_heads // a.n_kv_heads
        cos = self.cos[pos:pos + T, None, :]
        sin = self.sin[pos:pos + T, None, :]
        x = self.emb[tokens].astype(F32)                                   # (T, dim)
        causal = np.tril(np.ones((T, pos + T), dtype=bool), k=pos)
        for l in range(a.n_layers):
            p = f"layers.{l}."
            xb = rmsnorm(x, self.w[p + "attention_norm"], a.norm_eps)
            q = self.matmul(xb, p + "wq").reshape(T, a.n_heads, hd)
            k = self.matmul(xb, p + "wk").reshape(T, a.n_kv_heads, hd)
            v = self.matmul(xb, p + "wv")
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            self.key_cache[l, pos:pos + T] = k.reshape(T, -1)
            self.value_cache[l, pos:pos + T] = v
            keys = self.key_cache[l, :pos + T].reshape(pos + T, a.n_kv_heads, hd)
            vals = self.value_cache[l, :pos + T].reshape(pos + T, a.n_kv_heads, hd)
            # grouped-query attention: query head h reads KV head h // n_rep
            keys, vals = np.repeat(keys, n_rep, axis=1), np.repeat(vals, n_rep, axis=1)
            scores = np.einsum("thd,shd->hts", q.astype(np.float64), keys.astype(np.float64))
            scores = np.where(causal[None], scores / np.sqrt(hd), -np.inf)   # (H, T, S)
            att = softmax(scores)
            out = np.einsum("hts,shd->thd", att, vals.astype(np.float64)).reshape(T, a.dim)
            x = x + self.matmul(out.astype(F32), p + "wo")
            xb = rmsnorm(x, self.w[p + "ffn_norm"], a.norm_eps)
            h = (silu(self.matmul(xb, p + "w1")) * self.matmul(xb, p + "w3")).astype(F32)
            x = x + self.matmul(h, p + "w2")
        x = rmsnorm(x, self.w["norm"], a.norm_eps)
        return self.matmul(x, "output").astype(F32)

    def forward(self, token: int, pos: int) -> np.ndarray:
        """Logits (vocab_size,) of `token` at position `pos`; fills the KV cache at `pos`."""
        return self.forward_tokens([token], pos)[0]

    def prefill(self, tokens: list[int], pos: int) -> np.ndarray:
        """Logits (vocab_size,) of the last of `tokens`, the whole prompt at once; fills the KV
        cache at positions pos..pos+len(tokens)-1."""
        return self.forward_tokens(tokens, pos)[-1]

    def forward_sample(self, token: int, pos: int, temperature: float, topp: float,
                       rng: XorShiftRng) -> int:
        """The next token after `token` at `pos` (CLlama does this in one C call)."""
        return self.sample(self.forward(token, pos), temperature, topp, rng)

    def generate(self, prompt_ids: list[int], steps: int, temperature: float = 1.0,
                 topp: float = 0.9, seed: int | None = None, context_shift: bool = True,
                 n_keep: int = 1) -> Iterator[int]:
        """Tokens after the prompt, as run.c's generate loop: `steps` counts every position,
        prompt included; stops at BOS or EOS. Past max_seq_len the context shifts (see
        babyllama.context); with context_shift=False steps is clamped to max_seq_len, as
        run.c does."""
        yield from generate_loop(self, prompt_ids, steps, temperature, topp, seed,
                                 context_shift, n_keep)


def generate_loop(engine, prompt_ids: list[int], steps: int, temperature: float, topp: float,
                  seed: int | None, context_shift: bool = True, n_keep: int = 1
                  ) -> Iterator[int]:
    """The loop both engines share: the prompt in one prefill call, then one token at a
    time, each drawn with the engine's own sampler. With the context shift on, a prompt longer
    than the context keeps its first n_keep tokens and its newest ones (kept_after_shift);
    with it off, such a prompt is an error and steps stop at max_seq_len (the checks and the
    clamp: babyllama.context.check_generate_args, shared with the C engine)."""
    check_sampling(temperature, topp)
    seq_len = engine.args.max_seq_len
    steps, shift = check_generate_args(len(prompt_ids), steps, seq_len, context_shift, n_keep)
    ctx = Context(engine.prefill, seq_len, n_keep, shift, engine.args.vocab_size)
    rng = XorShiftRng(seed if seed is not None else random_seed())
    engine.reset()
    n = len(prompt_ids)
    if steps <= n - 1:
        return
    logits = ctx.feed(prompt_ids)
    pos = n   # counts every position fed, as run.c's pos (it no longer indexes the cache)
    while True:
        nxt = sample_at(engine, logits, pos - 1, temperature, topp, rng)
        if nxt in (BOS, EOS):
            return
        yield nxt
        if pos >= steps:
            return
        logits = ctx.feed([nxt])
        pos += 1
