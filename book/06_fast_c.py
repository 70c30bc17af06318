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
# # Chapter 6 — A fast C kernel, loaded with ctypes
#
# NumPy spends most of a token's time in Python between small array operations. llama2.c shows
# that a few hundred lines of C do the same forward pass much faster. Our C library (`csrc/`)
# reads the same files, runs the same math and the same sampler as chapter 5, and Python calls
# it through `ctypes`. Almost all of the time goes into one function, the matrix–vector product,
# so we start there: a naive C loop, compiled and loaded from this notebook, then the
# library's SIMD + OpenMP version.

# %%
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from babyllama import book, fast_c
from babyllama.fast_c import CLlama, CTokenizer
from babyllama.inference_numpy import NumpyLlama
from babyllama.tokenizer import Tokenizer

paths = book.Paths.find()
files = book.ensure_exports(paths)
tok = Tokenizer.from_bin(paths.tok_bin)

# %% [markdown]
# ## 6.1 A naive matmul in C
#
# `W (d, n) @ x (n,)`: one dot product per output row.

# %%
naive_c = r"""
void matmul_naive(float *xout, const float *x, const float *w, int n, int d) {
    for (int i = 0; i < d; i++) {
        float val = 0.0f;
        for (int j = 0; j < n; j++) val += w[i * n + j] * x[j];
        xout[i] = val;
    }
}
"""
build = Path(tempfile.mkdtemp())
(build / "naive.c").write_text(naive_c)
cc = os.environ.get("CC", "cc")
subprocess.run([cc, "-O2", "-shared", "-fPIC", str(build / "naive.c"), "-o",
                str(build / "naive.so")], check=True)
naive = ctypes.CDLL(str(build / "naive.so"))
f32p = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
naive.matmul_naive.argtypes = [f32p, f32p, f32p, ctypes.c_int, ctypes.c_int]
naive.matmul_naive.restype = None

rng = np.random.default_rng(0)
d, n = 2048, 768                      # w1 of a stories110M layer
W = rng.standard_normal((d, n), dtype=np.float32)
x = rng.standard_normal(n, dtype=np.float32)
out = np.zeros(d, dtype=np.float32)
naive.matmul_naive(out, x, W, n, d)
assert np.allclose(out, W @ x, rtol=1e-4, atol=1e-3)
print("naive C == NumPy")

# %% [markdown]
# The library's `bl_matmul_f32` (`csrc/kernels.c`) differs in three ways: it splits rows across
# threads with OpenMP; it computes four rows at a time so each load of `x` serves four rows;
# and inside a row it uses SIMD fused multiply-adds (AVX2 or NEON) with independent
# accumulators. `babyllama.fast_c` compiles `csrc/` the first time it is needed (flags:
# `-O3 -march=native`, OpenMP when the compiler has it) and caches the library by a hash of
# sources, compiler and flags.

# %%
lib = fast_c.load_library()
lib.bl_matmul_f32.argtypes = [f32p, f32p, f32p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
lib.bl_matmul_f32.restype = None
out2 = np.zeros(d, dtype=np.float32)
lib.bl_matmul_f32(out2, x, W, n, d, 2)
assert np.allclose(out2, W @ x, rtol=1e-4, atol=1e-3)
print("library matmul == NumPy")

# %%
# NBVAL_IGNORE_OUTPUT
def gflops(fn, reps=200):
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return 2 * d * n * reps / (time.perf_counter() - t0) / 1e9


rows = [("naive C, 1 thread", lambda: naive.matmul_naive(out, x, W, n, d)),
        ("SIMD C, 1 thread", lambda: lib.bl_matmul_f32(out2, x, W, n, d, 1)),
        ("SIMD C, 2 threads", lambda: lib.bl_matmul_f32(out2, x, W, n, d, 2)),
        ("NumPy (BLAS)", lambda: W @ x)]
for name, fn in rows:
    print(f"{name:20} {gflops(fn):6.1f} GFLOP/s")

# %% [markdown]
# ## 6.2 The whole forward pass, token for token
#
# `CLlama.load(path, threads)` has chapter 5's interface. The C side validates the file
# (header, sizes, file length) before it maps it; every entry point returns an error code and
# a message, which Python raises. For int8 (v2) files, activations are quantized before each
# matmul as in llama2.c's runq.c; both engines do the small operations (norms, softmax, RoPE)
# in double precision and round to float32, so they agree to the last bit before every
# quantization — otherwise one flipped rounding would move a logit by a whole quantization step.

# %%
prompt = tok.encode("Once upon a time, there was a little dog", bos=True)
for v in (0, 1, 2):
    c, py = CLlama.load(files[v], threads=2), NumpyLlama.load(files[v])
    a = np.stack([c.forward(t, i) for i, t in enumerate(prompt)])
    b = np.stack([py.forward(t, i) for i, t in enumerate(prompt)])
    print(f"v{v}: C vs NumPy, every position: max |Δlogit| < 1e-4: {np.abs(a - b).max() < 1e-4}")
    assert np.abs(a - b).max() < 1e-4

# %% [markdown]
# The sampler and its xorshift random generator are the same too, so the engines draw the same
# tokens from the same seed — greedy or sampled, fp32 or int8:

# %%
start = tok.encode("Once upon a time", bos=True)
for v in (0, 2):
    for temperature, topp in ((0.0, 0.9), (1.0, 0.9)):
        c_ids = list(CLlama.load(files[v]).generate(start, 256, temperature, topp, seed=42))
        np_ids = list(NumpyLlama.load(files[v]).generate(start, 256, temperature, topp, seed=42))
        assert c_ids == np_ids
        print(f"v{v} temperature {temperature}: C and NumPy drew identical tokens")
c_tok = CTokenizer(paths.tok_bin)
assert c_tok.encode("Once upon a time 🐈") == tok.encode("Once upon a time 🐈")

# %%
# NBVAL_IGNORE_OUTPUT
engine = CLlama.load(files[0], threads=2)
print("Once upon a time" + "".join(tok.stream(engine.generate(start, 256, 0.8, 0.9, seed=7),
                                             prev=start[-1])))

# %% [markdown]
# The same library is a command-line program with llama2.c's flags
# (`make -C csrc && ./csrc/run out/book_v0.bin -z out/tok512.bin -i "Once upon a time"`), and
# `babyllama generate ... --engine c`.
#
# ## 6.3 Where a token's time goes
#
# A token reads every weight once: stories15M in fp32 is 61 MB per token. That is far more than
# the CPU caches hold, so the weights stream from main memory, and two cores of this machine
# stream about 17–20 GB/s: at most ~300 tokens/s, however fast the arithmetic. Once the matmul
# is SIMD, the rest of the kernel is about not wasting that stream:
#
# - **Prefetch.** `dot4_f32` asks for the next block of 4 rows while it sums the current one.
#   stories15M's rows are short (288 floats), and the hardware prefetcher alone left each
#   thread waiting at the start of every block (one core: 10 → 11–12 GB/s).
# - **Fewer forks.** `wq`, `wk`, `wv` read the same input, and so do `w1`, `w3`: each group
#   runs in one OpenMP region (`bl_matmuls_f32`), the threads meeting once instead of three
#   times.
# - **Attention that streams.** The KV cache is laid out per KV head,
#   `(n_layers, n_kv_heads, seq_len, head_size)`, so a head's keys at positions 0..pos are one
#   contiguous run rather than `head_size` floats out of every `kv_dim`-float row.
# - **Nothing recomputed.** RoPE's `cos`/`sin` table (`freqs_cos`, `freqs_sin`) is made once
#   at load, not per token and layer.
# - **No thread idles in the sampler.** The softmax over 32,000 logits (in double, like
#   NumPy's, so that both engines draw the same token) is split in fixed chunks across the
#   threads; combining the chunks in a fixed order keeps the result the same for any thread
#   count.
#
# On the machine this book was written on (2 cores), `bench/bench_engines.py --llama2c`
# measured our CLI against llama2.c's `run` and `runq` (built `-Ofast -fopenmp
# -march=native`) on the same files, as the median ratio of 7 back-to-back pairs, at 1 and 2
# threads: stories15M fp32 1.16× and 1.24×, int8 1.45× and 1.54×; stories110M fp32 1.20× and
# 1.22×, int8 1.54× and 1.39×; stories260K fp32 1.10× and 1.45×, int8 1.36× and 1.37×.
#
# ## 6.4 How fast?
#
# `bench/bench_engines.py` times every engine side by side — C at 1 and 2 threads, NumPy and
# PyTorch, fp32 and int8, prompt processing and generation separately — on stories260K-, 15M-
# and 110M-shaped models, prints a table and saves a plot. With `--llama2c DIR` it also runs
# llama2.c's own `run`/`runq` on the same files. Here is a quick run on the two smaller shapes.
# Note how stories15M's int8 file, 3.6 times smaller, is generated about twice as fast as its
# fp32 one: the memory traffic, not the arithmetic, sets the pace. (This machine is shared and
# its speed drifts by ±20% from minute to minute; compare rows of one run, not across runs.)

# %%
# NBVAL_IGNORE_OUTPUT
sys.path.insert(0, str(paths.root / "bench"))
import bench_engines  # noqa: E402

rows = bench_engines.run_engines(["stories260K", "stories15M"], prompt_len=16, gen=32,
                                 threads=2)
bench_engines.print_table(rows)
png = bench_engines.plot(rows, paths.out / "bench_chapter06.png")

# %%
# NBVAL_IGNORE_OUTPUT
from IPython.display import Image  # noqa: E402

Image(str(png))
