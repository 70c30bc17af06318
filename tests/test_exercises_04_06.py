"""Solutions to the exercises of chapters 04-06, checked against the library or an independent
computation. (Merged into tests/test_exercises.py with chapters 01-03.)"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import scaled_model

from babyllama import fast_c
from babyllama.export import choose_group_size, read_header, write_model
from babyllama.fast_c import CLlama
from babyllama.inference_numpy import (
    NumpyLlama,
    XorShiftRng,
    quantize_rows,
    sample,
)
from babyllama.model import ModelArgs

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=96,
                 max_seq_len=32)


def untied(model):
    model.output.weight = torch.nn.Parameter(model.tok_embeddings.weight.detach() * 0.5)
    return model


# ---------------------------------------------------------------------------------------------
# chapter 04

def read_v0_header(path: Path) -> tuple[dict, bool]:
    """Exercise 4.1: the seven int32 of a v0 header; a negative vocab_size = unshared."""
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    values = dict(zip(names, struct.unpack("<7i", Path(path).read_bytes()[:28])))
    shared = values["vocab_size"] > 0
    values["vocab_size"] = abs(values["vocab_size"])
    return values, shared


@pytest.mark.parametrize("shared", [True, False])
def test_ex4_1_read_v0_header(tmp_path, shared):
    model = scaled_model(TINY)
    if not shared:
        untied(model)
    path = write_model(model, tmp_path / "m.bin", version=0)
    values, is_shared = read_v0_header(path)
    args, version, lib_shared, _, _ = read_header(path)
    assert version == 0 and is_shared == lib_shared == shared
    assert values == {"dim": args.dim, "hidden_dim": args.hidden_dim, "n_layers": args.n_layers,
                      "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
                      "vocab_size": args.vocab_size, "seq_len": args.max_seq_len}


def v2_size(a: ModelArgs, shared: bool, gs: int) -> int:
    """Exercise 4.2: header + fp32 norms + (1 + 4/gs) bytes per matrix weight."""
    kv_dim = a.n_kv_heads * a.head_dim
    per_layer = a.dim * (2 * a.dim + 2 * kv_dim) + 3 * a.dim * a.hidden_dim
    matrix_weights = a.n_layers * per_layer + a.vocab_size * a.dim * (1 if shared else 2)
    norms = (2 * a.n_layers + 1) * a.dim
    return 256 + 4 * norms + matrix_weights + 4 * (matrix_weights // gs)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("hidden", [96, 100])   # group size 32, then 4
def test_ex4_2_v2_size(tmp_path, shared, hidden):
    a = ModelArgs(**{**TINY.to_dict(), "hidden_dim": hidden})
    model = scaled_model(a)
    if not shared:
        untied(model)
    path = write_model(model, tmp_path / "m.bin", version=2)
    gs = choose_group_size(a)
    assert gs == (32 if hidden == 96 else 4)
    assert path.stat().st_size == v2_size(a, shared, gs)


def quantize_asym(w: np.ndarray, gs: int) -> np.ndarray:
    """Exercise 4.3: uint8 with a per-group minimum and step; returns the dequantized values."""
    g = w.reshape(-1, gs).astype(np.float64)
    lo, hi = g.min(axis=1, keepdims=True), g.max(axis=1, keepdims=True)
    step = np.where(hi > lo, (hi - lo) / 255, 1.0)
    q = np.clip(np.round((g - lo) / step), 0, 255)
    return (q * step + lo).reshape(w.shape)


def test_ex4_3_asymmetric_halves_the_error_on_positive_groups():
    w = np.random.default_rng(0).uniform(0.0, 1.0, 32 * 4096)
    g = w.reshape(-1, 32)
    s = np.abs(g).max(axis=1, keepdims=True) / 127
    sym = np.abs(np.round(g / s) * s - g).mean()
    asym = np.abs(quantize_asym(w, 32) - w).mean()
    assert 0.4 < asym / sym < 0.6
    # the price: a second fp32 (the minimum) per group, 1 + 8/32 = 1.25 bytes per weight
    assert (32 + 8) / 32 == 1.25


def kv_cache_bytes(a: ModelArgs, bytes_per_value: int) -> int:
    return 2 * a.n_layers * a.n_kv_heads * a.head_dim * a.max_seq_len * bytes_per_value


def test_ex4_4_kv_cache_of_llama2_70b(tmp_path):
    # the formula, against the cache the NumPy engine really allocates (fp32)
    engine = NumpyLlama.load(write_model(scaled_model(TINY), tmp_path / "m.bin", version=0))
    assert kv_cache_bytes(TINY, 4) == engine.key_cache.nbytes + engine.value_cache.nbytes
    a70 = ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000,
                    hidden_dim=28672, max_seq_len=4096)
    assert kv_cache_bytes(a70, 2) == 1_342_177_280           # 1.34 GB with GQA
    mha = ModelArgs(**{**a70.to_dict(), "n_kv_heads": 64})
    assert kv_cache_bytes(mha, 2) == 8 * 1_342_177_280       # 10.7 GB without


# ---------------------------------------------------------------------------------------------
# chapter 05

def _probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = (logits / np.float32(temperature)).astype(np.float64)   # as the library: float32
    e = np.exp(z - z.max())                                      # divide, float64 softmax,
    return (e / e.sum()).astype(np.float32)                      # float32 probabilities


def _draw(probs: np.ndarray, coin: float) -> int:
    hit = np.nonzero(np.float32(coin) < np.cumsum(probs, dtype=np.float32))[0]
    return int(hit[0]) if hit.size else len(probs) - 1


def sample_topk(logits: np.ndarray, k: int, temperature: float, coin: float) -> int:
    """Exercise 5.1: softmax over the k largest logits (the rest get -inf), then draw."""
    keep = np.argsort(-logits, kind="stable")[:k]
    masked = np.full_like(logits, -np.inf)
    masked[keep] = logits[keep]
    return _draw(_probs(masked, temperature), coin)


def sample_minp(logits: np.ndarray, min_p: float, temperature: float, coin: float) -> int:
    """Exercise 5.2: keep tokens with p >= min_p * max p, renormalise, draw."""
    p = _probs(logits, temperature).astype(np.float64)
    p = np.where(p >= min_p * p.max(), p, 0.0)
    return _draw((p / p.sum()).astype(np.float32), coin)


def test_ex5_1_topk():
    g = np.random.default_rng(1)
    for seed in range(1, 60):
        logits = (g.standard_normal(200) * 3).astype(np.float32)
        coin = XorShiftRng(seed).f32()
        assert sample_topk(logits, 1, 1.0, coin) == int(np.argmax(logits))
        top5 = set(np.argsort(-logits)[:5].tolist())
        assert sample_topk(logits, 5, 1.0, coin) in top5
        # k = vocab_size: plain multinomial sampling, the library's draw from the same coin
        assert sample_topk(logits, 200, 0.8, coin) == sample(logits, 0.8, 1.0, XorShiftRng(seed))


def test_ex5_2_minp_never_draws_below_the_threshold():
    g = np.random.default_rng(2)
    for seed in range(1, 200):
        logits = (g.standard_normal(100) * 2).astype(np.float32)
        t = sample_minp(logits, 0.1, 1.0, XorShiftRng(seed).f32())
        p = _probs(logits, 1.0)
        assert p[t] >= 0.1 * p.max()


def test_ex5_3_perplexity_numpy_equals_pytorch(tmp_path):
    model = scaled_model(TINY, scale=4.0)
    engine = NumpyLlama.load(write_model(model, tmp_path / "m.bin", version=0))
    tokens = np.random.default_rng(3).integers(0, TINY.vocab_size, 20).tolist()
    logits = engine.forward_tokens(tokens[:-1], 0).astype(np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    nll = -logp[np.arange(len(tokens) - 1), tokens[1:]].mean()
    with torch.no_grad():
        ref = F.cross_entropy(model(torch.tensor([tokens[:-1]]))[0][0],
                              torch.tensor(tokens[1:])).item()
    assert abs(nll - ref) < 1e-4
    assert abs(np.exp(nll) - np.exp(ref)) < 1e-3 * np.exp(ref)


# ---------------------------------------------------------------------------------------------
# chapter 06

FOUR_ROWS_C = r"""
void matmul4(float *xout, const float *x, const float *w, int n, int d) {
    int i = 0;
    for (; i + 4 <= d; i += 4) {          /* four rows share each load of x[j] */
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (int j = 0; j < n; j++) {
            float xj = x[j];
            s0 += w[(i + 0) * n + j] * xj; s1 += w[(i + 1) * n + j] * xj;
            s2 += w[(i + 2) * n + j] * xj; s3 += w[(i + 3) * n + j] * xj;
        }
        xout[i] = s0; xout[i + 1] = s1; xout[i + 2] = s2; xout[i + 3] = s3;
    }
    for (; i < d; i++) {                  /* the last d % 4 rows, one at a time */
        float s = 0;
        for (int j = 0; j < n; j++) s += w[i * n + j] * x[j];
        xout[i] = s;
    }
}
"""


def test_ex6_1_four_rows_at_a_time(tmp_path):
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    (tmp_path / "m4.c").write_text(FOUR_ROWS_C)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", str(tmp_path / "m4.c"), "-o",
                    str(tmp_path / "m4.so")], check=True)
    lib = ctypes.CDLL(str(tmp_path / "m4.so"))
    f32p = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
    lib.matmul4.argtypes = [f32p, f32p, f32p, ctypes.c_int, ctypes.c_int]
    g = np.random.default_rng(4)
    for d in range(1, 10):                   # every remainder d % 4
        W = g.standard_normal((d, 37), dtype=np.float32)
        x = g.standard_normal(37, dtype=np.float32)
        out = np.zeros(d, dtype=np.float32)
        lib.matmul4(out, x, W, 37, d)
        np.testing.assert_allclose(out, W.astype(np.float64) @ x, rtol=1e-5, atol=1e-5)


def test_ex6_2_c_quantize_equals_numpy():
    lib = fast_c.load_library()
    lib.bl_quantize.argtypes = [np.ctypeslib.ndpointer(np.int8, flags="C_CONTIGUOUS"),
                                np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS"),
                                np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS"),
                                ctypes.c_int, ctypes.c_int]
    lib.bl_quantize.restype = None
    g = np.random.default_rng(5)
    for gs in (4, 32):
        x = g.standard_normal(256).astype(np.float32)
        x[:gs] = 0.0                                 # an all-zero group: scale 0, values 0
        x[gs] = 127 * 0.5 / 127                      # ties away from zero show up here
        q, s = np.zeros(256, np.int8), np.zeros(256 // gs, np.float32)
        lib.bl_quantize(q, s, x, 256, gs)
        q_ref, s_ref = quantize_rows(x, gs)
        assert np.array_equal(q, q_ref) and np.array_equal(s, s_ref)


def test_ex6_3_threads_do_not_change_the_logits(tmp_path):
    path = write_model(scaled_model(ModelArgs(dim=256, n_layers=2, n_heads=4, vocab_size=256,
                                              hidden_dim=768, max_seq_len=16), scale=3.0),
                       tmp_path / "m.bin", version=0)
    one, two = CLlama.load(path, threads=1), CLlama.load(path, threads=2)
    for pos, t in enumerate([1, 7, 42, 9]):
        assert np.array_equal(one.forward(t, pos), two.forward(t, pos))   # bit for bit
