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

import matplotlib.pyplot as plt
import numpy as np

from babyllama import book, fast_c
from babyllama.config import PRESETS, ModelArgs
from babyllama.export import (
    _payload_size,
    choose_group_size,
    layer_shapes,
    read_header,
    write_model,
)
from babyllama.fast_c import CLlama, CTokenizer
from babyllama.inference_numpy import NumpyLlama
from babyllama.tokenizer import Tokenizer

paths = book.Paths.find()
files = book.ensure_exports(paths)
tok = Tokenizer.from_bin(paths.tok_bin)

# %% [markdown]
# ## 6.1 A naive matmul in C
#
# `W (d, n) @ x (n,)`: one dot product per output row. We compile the C into a shared library
# (`-shared -fPIC`), load it with `ctypes.CDLL` and declare its argument types:
# `np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")` lets a contiguous float32 NumPy
# array be passed as a `float *` (ctypes checks its dtype and layout), `c_int` the sizes, and
# `restype = None` says the function returns `void`.

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
# ## 6.2 The SIMD kernel
#
# The library's `bl_matmul_f32` (`csrc/kernels.c`) computes the same thing faster in three
# ways: it splits the rows across threads with OpenMP; it computes **four rows at a time**, so
# each load of `x` serves four rows; and inside a row it uses **SIMD** instructions that work on
# 8 floats at once. Here is its inner function, read from the source file:

# %%
def c_function(path: Path, name: str) -> str:
    """The source of C function `name` in `path`, with the comment just above it."""
    lines = path.read_text().splitlines()
    first = next((i for i, line in enumerate(lines)
                  if f" {name}(" in line and not line.rstrip().endswith(";")), None)
    if first is None:
        raise LookupError(f"{path}: no function {name}")
    while first > 0 and lines[first - 1].lstrip().startswith(("/*", "*")):
        first -= 1
    depth, seen = 0, False
    for last in range(first, len(lines)):
        depth += lines[last].count("{") - lines[last].count("}")
        seen = seen or "{" in lines[last]
        if seen and depth == 0:
            return "\n".join(lines[first:last + 1])
    raise LookupError(f"{path}: function {name} has no end")


kernels = paths.root / "csrc" / "kernels.c"
print(c_function(kernels, "dot4_f32"))

# %% [markdown]
# Reading it from the top:
#
# - `__m256` is an AVX2 register holding 8 floats. `_mm256_loadu_ps(w0 + j)` loads 8
#   consecutive weights of row 0; `_mm256_fmadd_ps(a, b, c)` computes `a * b + c` on all 8
#   lanes in one instruction (a *fused* multiply-add: one rounding instead of two).
# - `xv`, the 8 values of `x`, is loaded once and used by four rows: per step, 5 loads feed 4
#   FMAs instead of 8 loads for 4 separate dot products.
# - `a0`..`a3` are one accumulator per row, so the four rows are four independent chains of
#   additions. An FMA takes about 4 cycles to deliver its result and the CPU can start two per
#   cycle: with a single chain each FMA would wait for the previous one. (Filling both FMA
#   units would take about 8 chains; once the weights come from main memory, memory is the
#   limit anyway — §6.5.)
# - After the loop, `hsum256` adds the 8 lanes of each accumulator; the plain `for` loop at the
#   end handles the last `n % 8` values, so any row length works.
# - `__builtin_prefetch` asks the memory system for the *next* four rows while these are
#   summed, so they are (partly) in cache when their turn comes (§6.4).
# - The `BL_NEON` branch is the same on ARM (4 floats per register); with neither, only the
#   portable loop runs. The compiler picks the branch from `-march=native`.
#
# The sum is added in a different order than NumPy's, so the results agree to rounding
# (`rtol=1e-4`), not bit for bit. The int8 kernel of v2 files has the same shape; its inner
# product over one group of `gs` int8 pairs is exact integer arithmetic. It lives in
# `csrc/simd.h` (`idot`) with one branch per instruction set the build can select
# (`-DBL_SIMD=...`: portable, AVX2, VNNI and an emulation of VNNI, NEON/sdot). Its SIMD branches
# need groups whose size is a multiple of 16 or 32, which matters in §6.5; §6.7 shows its
# source, once the instructions it uses are explained.
#
# `babyllama.fast_c` compiles `csrc/` the first time it is needed (flags: `-O3
# -march=native`, OpenMP when the compiler has it) and caches the library by a hash of
# sources, compiler and flags. Its matmul against NumPy:

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
def gflops(fn, reps=50):
    time.sleep(0.5)   # let NumPy's BLAS threads go idle first (see below)
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
# The naive loop is several times slower than the SIMD kernel: C may not reorder a float sum,
# so without `-ffast-math` the compiler cannot split `val += …` across SIMD lanes, and every
# addition waits for the previous one (it is also built without `-march=native`, so with
# older instructions). The SIMD kernel on one thread keeps up with NumPy's BLAS. The matrix
# (6.3 MB) stays in the 32 MB L3 cache across the repetitions, so these are in-cache speeds;
# §6.5 measures main memory. A second thread rarely gives 2× on a matrix this small: each call
# forks and joins the threads (§6.5), and when the other core is busy the call waits for it.
# One thing keeps it busy in this very process: after each call, NumPy's BLAS (OpenBLAS) lets
# its worker threads spin, waiting for more work, for about a tenth of a second. A 2-thread
# call of ours started in that window ran here at as little as a tenth of its speed, which is
# why `gflops` pauses half a second before it times anything.
#
# ## 6.3 The whole forward pass, token for token
#
# `CLlama.load(path, threads)` has chapter 5's interface. The C side validates the file
# (header, sizes, file length) before it maps it; every entry point returns an error code and
# a message, which Python raises. For int8 (v2) files, activations are quantized before each
# matmul as in llama2.c's runq.c. fp32 logits differ from NumPy's in the last digits (~1e-6):
# the C matmul adds in another order. int8 logits are identical: group sums are exact
# integers, and both engines do the small operations (norms, softmax, RoPE) in double and
# round to float32, so both quantize the very same activations. (Were one rounding different
# before a quantization, a logit could move by a whole quantization step.)

# %%
# NBVAL_IGNORE_OUTPUT
# (the last digits depend on the weights and the CPU; the bound is checked)
prompt = tok.encode("Once upon a time, there was a little dog", bos=True)
for v in (0, 1, 2):
    c, py = CLlama.load(files[v], threads=2), NumpyLlama.load(files[v])
    a = np.stack([c.forward(t, i) for i, t in enumerate(prompt)])
    b = np.stack([py.forward(t, i) for i, t in enumerate(prompt)])
    print(f"v{v}: C vs NumPy, every position: max |Δlogit| = {np.abs(a - b).max():.1e} "
          f"(bound 1e-4)")
    assert np.abs(a - b).max() < 1e-4

# %% [markdown]
# The sampler and its xorshift random generator are the same too, so the engines draw the same
# tokens from the same seed — greedy or sampled, fp32 or int8:

# %%
# NBVAL_IGNORE_OUTPUT
# (how many tokens, before </s>, depends on the trained weights)
start = tok.encode("Once upon a time", bos=True)
for v in (0, 2):
    for temperature, topp in ((0.0, 0.9), (1.0, 0.9)):
        c_ids = list(CLlama.load(files[v]).generate(start, 128, temperature, topp, seed=42))
        np_ids = list(NumpyLlama.load(files[v]).generate(start, 128, temperature, topp, seed=42))
        same = sum(x == y for x, y in zip(c_ids, np_ids))
        print(f"v{v} temperature {temperature}: C drew {len(c_ids)} tokens, NumPy "
              f"{len(np_ids)}, identical at {same} positions (must be all)")
        assert c_ids == np_ids
c_tok = CTokenizer(paths.tok_bin)
same_ids = c_tok.encode("Once upon a time 🐈") == tok.encode("Once upon a time 🐈")
print(f"the C tokenizer gives the Python tokenizer's ids: {same_ids} (must be True)")
assert same_ids

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
# ## 6.4 Where a token's time goes
#
# A token reads every weight once: stories15M in fp32 is 61 MB per token. That is more than
# the CPU caches hold (on this AMD EPYC: L1, 32 KB per core, the fastest; L2, 512 KB per core;
# L3, 32 MB shared by the cores), so the weights stream from main memory (DRAM), and the speed
# of that stream caps the tokens per second however fast the arithmetic (§6.5 measures both).
# Profiled with `perf` on that machine, 91% of a stories15M fp32 token is spent in the
# matmuls, 4% in attention and 2% in the sampler. Once the matmul is SIMD, the rest of the
# kernel is about not wasting that stream:
#
# - **Prefetch.** `dot4_f32` asks for the next block of 4 rows while it sums the current one.
#   stories15M's rows are short (288 floats), and the hardware prefetcher alone left each
#   thread waiting at the start of every block (one core of an AMD EPYC Zen 3: 10 → 11–12
#   GB/s).
# - **Fewer forks.** `wq`, `wk`, `wv` read the same input, and so do `w1`, `w3`: each group
#   runs in one OpenMP region (`bl_matmuls_f32`), the threads meeting once instead of three
#   (or two) times.
# - **Attention that streams.** The KV cache is laid out per KV head,
#   `(n_layers, n_kv_heads, seq_len, head_size)` (`head_size` is run.c's name for `head_dim`,
#   and our C code keeps it), so a head's keys at positions 0..pos are one contiguous run
#   rather than `head_size` floats out of every `kv_dim`-float row.
# - **Nothing recomputed.** RoPE's `cos`/`sin` table (`freqs_cos`, `freqs_sin`) is made once
#   at load, not per token and layer.
# - **The sampler's softmax is shared.** The softmax over 32,000 logits (in double, like
#   NumPy's, so that both engines draw the same token) is split in fixed chunks across the
#   threads (for vocabularies of 8,192 and up); combining the chunks in a fixed order keeps the
#   result the same for any thread count.
#
# On a quiet 2-core AMD EPYC (AVX2, December 2026), `bench/bench_engines.py --llama2c`
# measured our CLI against llama2.c's `run` and `runq` (built `-Ofast -fopenmp
# -march=native`) on the same files, as the median ratio (our tokens/s ÷ llama2.c's: above 1,
# ours is faster) of 7 back-to-back pairs (differences under ~10% are within the
# session-to-session noise of this machine):
#
# | ours ÷ llama2.c | fp32, 1 thread | fp32, 2 threads | int8, 1 thread | int8, 2 threads |
# | --- | --- | --- | --- | --- |
# | stories260K | 1.24 | 1.32 | 4.86 | 3.09 |
# | stories15M | 0.85 | 0.92 | 2.13 | 1.79 |
# | stories110M | 1.00 | 0.94 | 1.64 | 1.61 |
#
# In fp32 both programs read the same 61 or 438 MB per token from main memory, and a
# matrix–vector product has nothing to win once it reads as fast as the other: timed alone on
# the models' matrices, our matmul and run.c's loop stream at the same rate (±5%). stories15M
# trails because of what surrounds the matmul: with run.c's own matmul loop compiled into our
# engine it still ran at 0.95× of run.c; our attention and sampler compute in double (so that
# NumPy and C draw the same tokens), run.c's in float. In int8 the arithmetic is the limit:
# runq.c sums each group in a scalar loop, ours with SIMD integer instructions (§6.7).
#

# %% [markdown]
# ## 6.5 How fast, and what sets the pace
#
# Two limits bound the speed of a token. **Memory**: every weight is read once per token, so
# tokens/s ≤ bandwidth ÷ bytes per token. **Arithmetic**: every weight is one multiply-add, so
# tokens/s ≤ (multiply-adds per second the kernel sustains) ÷ weights. Whichever is lower wins.
#
# First the memory limit: the fastest our fp32 kernel streams a 134 MB matrix — four times the
# 32 MB L3 cache of this CPU, so it comes from DRAM — at 1 and 2 threads. (This machine is
# shared and its speed drifts from minute to minute: every number below is the best of a few
# interleaved tries, and ratios within one run mean more than absolute values.)

# %%
# NBVAL_IGNORE_OUTPUT
# (timings)
def best_seconds(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def dram_bandwidth(threads: int, d: int = 8192, n: int = 4096) -> float:
    """GB/s of our fp32 kernel on a (d, n) matrix far larger than the caches."""
    W = np.full((d, n), 0.5, dtype=np.float32)
    x, out = np.ones(n, dtype=np.float32), np.zeros(d, dtype=np.float32)
    return W.nbytes / best_seconds(lambda: lib.bl_matmul_f32(out, x, W, n, d, threads), 5) / 1e9


bandwidth = {th: dram_bandwidth(th) for th in (1, 2)}
for th, bw in bandwidth.items():
    print(f"{th} thread{'s' if th > 1 else ''}: {bw:5.1f} GB/s from DRAM")

# %% [markdown]
# Now the whole C engine, generating one token at a time, on models with the shapes of
# stories260K, stories15M and stories110M (random weights: speed does not depend on what a model
# learned; `bench/bench_engines.py` makes and caches them in `out/bench/`), fp32 and int8, at 1
# and 2 threads. Bytes per token are the file's weights (decoding reads one row of the
# embedding table, but the classifier shares that table and reads all of it, so it counts
# once, in full).

# %%
# NBVAL_IGNORE_OUTPUT
# (timings)
sys.path.insert(0, str(paths.root / "bench"))
import bench_engines  # noqa: E402


def bytes_per_token(path: Path) -> int:
    a, version, shared, gs, _ = read_header(path)
    return _payload_size(a, 2 if version == 2 else 1, shared, gs)


def gen_speed(engine, seconds: float = 0.25) -> float:
    """Generated tokens/s: one token at a time, positions 0..63 over and over."""
    engine.reset()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        engine.forward(5, n % 64)
        n += 1
    return n / (time.perf_counter() - t0)


shapes = ["stories260K", "stories15M", "stories110M"]
runs = {(s, fmt, th): CLlama.load(bench_engines.make_files(s)[v], threads=th)
        for s in shapes for fmt, v in (("fp32", 0), ("int8", 2)) for th in (1, 2)}
speed = {k: 0.0 for k in runs}
for _ in range(3):                        # interleaved, best of 3: the machine drifts
    for k, engine in runs.items():
        speed[k] = max(speed[k], gen_speed(engine))
nbytes = {(s, fmt): bytes_per_token(bench_engines.make_files(s)[v])
          for s in shapes for fmt, v in (("fp32", 0), ("int8", 2))}
print(f"{'shape':12} {'format':6} {'MB/token':>9} {'tok/s 1 thr':>12} {'tok/s 2 thr':>12} "
      f"{'GB/s at 2 thr':>14} {'DRAM limit tok/s':>17}")
for s in shapes:
    for fmt in ("fp32", "int8"):
        b = nbytes[s, fmt]
        print(f"{s:12} {fmt:6} {b / 1e6:9.1f} {speed[s, fmt, 1]:12.0f} {speed[s, fmt, 2]:12.0f} "
              f"{b * speed[s, fmt, 2] / 1e9:14.1f} {bandwidth[2] * 1e9 / b:17.0f}")

# %%
# NBVAL_IGNORE_OUTPUT
# (timings)
fig, ax = plt.subplots(figsize=(7, 4.2))
x = np.geomspace(3e5, 1e9, 50)
for th, style in ((1, ":"), (2, "--")):
    ax.plot(x / 1e6, bandwidth[th] * 1e9 / x, "k" + style,
            label=f"DRAM limit, {th} thread{'s' if th > 1 else ''} ({bandwidth[th]:.0f} GB/s)")
ax.axvspan(3e5 / 1e6, 32, color="tab:green", alpha=0.08, label="fits in the 32 MB L3 cache")
for (s, fmt, th), v in speed.items():
    ax.scatter(nbytes[s, fmt] / 1e6, v, marker="o" if fmt == "fp32" else "s",
               color="tab:blue" if th == 1 else "tab:orange", zorder=3)
    if v == max(speed[s, fmt, 1], speed[s, fmt, 2]):
        ax.annotate(f"{s[7:]} {fmt}", (nbytes[s, fmt] / 1e6, v), fontsize=7,
                    xytext=(5, 3), textcoords="offset points")
ax.scatter([], [], color="tab:blue", label="1 thread")
ax.scatter([], [], color="tab:orange", label="2 threads")
ax.scatter([], [], marker="o", color="gray", label="fp32")
ax.scatter([], [], marker="s", color="gray", label="int8")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("weight bytes read per token (MB, log)")
ax.set_ylabel("generated tokens/s (log)")
ax.set_title("C engine: measured decoding speed against the memory limit")
ax.legend(fontsize=7, loc="upper right")
fig.tight_layout()
plt.show()

# %% [markdown]
# A point on the line for its thread count (dotted for 1, dashed for 2) reads weights as fast
# as DRAM delivers them; a point below it is limited by something else. Points in the green
# band are not limited by DRAM at all: their weights stay in the cache from one token to the
# next (stories260K's 1 MB). (This machine is shared and on a busy minute every point drops:
# read the table's ratios rather than its absolute numbers. Its column `GB/s at 2 thr` is
# tok/s × MB per token: how fast a model actually streamed its weights.)
#
# - **fp32 110M comes closest to the line**, at most of the 2-thread bandwidth; 15M further
#   below it: its rows are short (288 floats), so more of its time goes to starting rows, to
#   attention and to the sampler. Memory traffic sets fp32's pace.
# - **int8 does not get the 3.6× its smaller file promises.** The int8 models stream clearly
#   fewer GB/s than the fp32 ones in the same column, so memory is not what holds them back:
#   their arithmetic is. Per weight, the int8 kernel does more than an fp32 FMA lane does: an
#   int8 multiply, widening adds to int32, and per group a conversion to float and two
#   multiplies by the scales; and before every matmul it quantizes the activations. So int8's
#   limit is in *weights per second* (tok/s × weights per token), while fp32's is bandwidth ÷
#   4 bytes weights per second. The gain of int8 over fp32 is the ratio of the two:
#   `gain ≈ int8 weights/s × 4 bytes ÷ bandwidth`, if fp32 ran exactly at the DRAM limit.
# - **The gain depends on the CPU.** It is the ratio of two different limits, int8
#   arithmetic against fp32 memory traffic: `gain ≈ int8 weights/s × 4 bytes ÷ bandwidth`. A
#   CPU with more memory bandwidth per core runs fp32 faster but int8 no faster, and there the
#   gain falls towards 1× — on an Intel Xeon whose 480 MB L3 holds the whole 110M file, fp32
#   moved ~29 GB/s (~66 tok/s) and int8 decoded at 72 tok/s, a gain of 1.1× (measured for
#   this project's issue #13, with an earlier, slower int8 kernel); a CPU with faster int8 units
#   (AVX-512 VNNI, ARM's dot-product instructions) raises it.
# - stories15M's int8 file (17 MB) even fits in this CPU's 32 MB L3 cache, so after the first
#   token it hardly touches DRAM: there the arithmetic is all there is.
#
# The cell below puts this run's numbers into the formula (each format at its faster thread
# count; on a shared machine the faster try is the less disturbed one). It is a check of one
# assumption rather than a prediction — the int8 rate comes from the same measurement: the
# formula's gain and the measured one differ exactly by how far fp32 falls short of the DRAM
# limit (its GB/s against the bandwidth). Where fp32 reaches 65–80% of it, the measured gain
# is correspondingly above the formula's.

# %%
# NBVAL_IGNORE_OUTPUT
# (timings)
bw = max(bandwidth.values())
for s in ("stories15M", "stories110M"):
    weights = nbytes[s, "fp32"] / 4
    fp32, int8 = (max(speed[s, fmt, th] for th in (1, 2)) for fmt in ("fp32", "int8"))
    rate8 = int8 * weights
    print(f"{s}: fp32 {fp32 * nbytes[s, 'fp32'] / 1e9:.1f} GB/s of {bw:.1f}; int8 kernel "
          f"{rate8 / 1e9:.1f} G weights/s; predicted gain = {rate8 / 1e9:.1f} × 4 / {bw:.1f} = "
          f"{rate8 * 4 / (bw * 1e9):.1f}×, measured {int8 / fp32:.1f}×")

# %% [markdown]
# ### Why stories260K int8 is slower than fp32
#
# stories260K's `hidden_dim` is 172 = 4 × 43. Q8_0 groups must divide both `dim` (64) and
# `hidden_dim`, so the group size falls to **4**. A group of 4 is too short for `idot`'s SIMD
# branches (multiples of 32 or 16, §6.2), and a first version ran every such group through
# the scalar loop: int8 was 5 to 9 times slower than fp32. Now `qdot` computes the exact sums
# of 8 narrow groups in the lanes of one vector per step, and the activations are quantized
# two 4-wide groups at a time, each sum and scale still in the scalar loop's order (the same
# bits). int8 is still slower than fp32 on this model: the whole fp32 model (1 MB) sits in the
# caches, so fp32 never waits on memory and int8's smaller file buys nothing, while int8 still
# quantizes the activations before every matmul and converts and scales every group. Is the
# group of 4 itself still a cost? We give the same model `hidden_dim` 192 (= 3 × 64), which
# allows groups of 64, and time both (the fp32 figure is the 172-wide model's, from the table):

# %%
# NBVAL_IGNORE_OUTPUT
# (timings)
def random_model(a: ModelArgs, path: Path) -> Path:
    """A model with random weights, written with write_model from NumPy arrays (no torch)."""
    g = np.random.default_rng(0)
    w = {"tok_embeddings": g.standard_normal((a.vocab_size, a.dim)) * 0.02,
         "norm": np.ones(a.dim)}
    for l in range(a.n_layers):
        for name, shape in layer_shapes(a).items():
            w[f"layers.{l}.{name}"] = (np.ones(shape) if name.endswith("norm")
                                       else g.standard_normal(shape) * 0.02)
    return write_model((a, w, True), path, version=2)


base = PRESETS["stories260K"]
for hidden in (172, 192):
    a = ModelArgs(**{**base.to_dict(), "hidden_dim": hidden})
    f = random_model(a, build / f"h{hidden}.bin")
    engine = CLlama.load(f, threads=1)
    tok_s = max(gen_speed(engine) for _ in range(3))
    fp32_tok_s = speed["stories260K", "fp32", 1]
    print(f"hidden_dim {hidden}: group size {choose_group_size(a):2}, int8 {tok_s:7.0f} tok/s at "
          f"1 thread; fp32 (hidden_dim 172, {fp32_tok_s:.0f} tok/s) ÷ int8 = "
          f"{fp32_tok_s / tok_s:.1f}")

# %% [markdown]
# The two int8 rows show what the group of 4 still costs — in our runs between nothing and a
# third, within this shared machine's noise. The rest of int8's gap to fp32 is its per-matmul
# quantization and per-group work, against an fp32 model that never waits on memory.
#
# ### Why 2 threads can be slower than 1 on a tiny model
#
# Starting a parallel region (a block OpenMP runs on all the threads) wakes the other thread
# — the *fork* — and, at its end, waits for it — the *join*. That fork-join costs about a
# microsecond on an idle machine, far more when the other core is busy, while a stories260K
# matrix (64 × 64 = 4,096 multiply-adds) is
# a fraction of a microsecond of SIMD work: split in two, each half saves less than the
# meeting costs, and if the other core is busy with something else, the region waits for it.
# Here is a naive matmul with an OpenMP loop, timed at 1 and 2 threads on a tiny and on a large
# matrix, beside the cost of an empty parallel region:

# %%
# NBVAL_IGNORE_OUTPUT
# (timings)
omp_c, omp_l = fast_c.openmp_flags(cc)
if not omp_c:
    print("this compiler has no OpenMP: nothing to measure")
else:
    (build / "omp.c").write_text(r"""
    #include <omp.h>
    void matmul_omp(float *xout, const float *x, const float *w, int n, int d, int threads) {
        #pragma omp parallel for num_threads(threads)
        for (int i = 0; i < d; i++) {
            float val = 0.0f;
            for (int j = 0; j < n; j++) val += w[i * n + j] * x[j];
            xout[i] = val;
        }
    }
    double fork_join_us(int threads, int reps) {
        double t0 = omp_get_wtime();
        for (int r = 0; r < reps; r++) {
            #pragma omp parallel num_threads(threads)
            { __asm__ volatile("" ::: "memory"); }
        }
        return (omp_get_wtime() - t0) / reps * 1e6;
    }
    """)
    subprocess.run([cc, "-O3", "-march=native", "-shared", "-fPIC", *omp_c,
                    str(build / "omp.c"), "-o", str(build / "omp.so"), *omp_l], check=True)
    omp = ctypes.CDLL(str(build / "omp.so"))
    omp.matmul_omp.argtypes = [f32p, f32p, f32p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    omp.fork_join_us.argtypes, omp.fork_join_us.restype = [ctypes.c_int, ctypes.c_int], \
        ctypes.c_double
    print(f"an empty parallel region: {min(omp.fork_join_us(2, 500) for _ in range(3)):.2f} µs "
          f"at 2 threads")

    def omp_matmul_us(d: int, n: int, threads: int, reps: int) -> float:
        W = rng.standard_normal((d, n), dtype=np.float32)
        x, out = rng.standard_normal(n, dtype=np.float32), np.zeros(d, dtype=np.float32)
        run = lambda: [omp.matmul_omp(out, x, W, n, d, threads) for _ in range(reps)]  # noqa: E731
        return best_seconds(run, 3) / reps * 1e6

    for d_, n_, reps in ((64, 64, 300), (2048, 768, 5)):
        us = {th: omp_matmul_us(d_, n_, th, reps) for th in (1, 2)}
        print(f"{d_:4} x {n_:3} matmul: 1 thread {us[1]:8.2f} µs, 2 threads {us[2]:8.2f} µs")

# %% [markdown]
# (Both 64 × 64 timings include the cost of calling C from Python through `ctypes`, a few
# microseconds, the same at 1 and 2 threads. What the second thread adds is their difference:
# about a fork-join on an idle machine, several when the other core is busy and the region
# waits for it. On the large matrix the work dwarfs it, and 2 threads nearly halve the time.)
#
# So the library forks only when a batch of matmuls has at least 65,536 multiply-adds
# (`BL_PARALLEL_MIN` in `kernels.c`; for int8 the per-group overhead counts as work):
# stories260K's fp32 matmuls all run on one thread.
#
# One level up, the same reasoning picks a whole token's thread count. At dim 128 a token is
# about 0.8 million multiply-adds, a tenth of a millisecond on one core, spread over about nine
# parallel regions (each layer's attention and FFN, plus the classifier). On an idle machine a
# fork-join costs microseconds; on a busy one, where the other core is running something else,
# it can cost a scheduler time slice — milliseconds. So a forward or prefill whose tokens ×
# multiply-adds per token is below 2²² runs on one thread (`work_threads` in `model.h`): the
# book model and stories260K decode single-threaded, stories15M and up split (so the table's
# two stories260K columns differ only by noise). And the Python
# side of generation is one `ctypes` call per chunk of tokens, not a forward call and a
# sampler call per token: `CLlama.generate` runs the loop in C (`bl_context_generate`, with
# run.c's sampler and the same random state, so the tokens are still NumPy's).
#
# `bench/bench_engines.py` times every engine side by side — C at 1 and 2 threads, NumPy and
# PyTorch, prompt processing and generation separately — and saves a plot; with
# `--llama2c DIR` it also runs llama2.c's own `run`/`runq` on the same files.

# %% [markdown]
# ## 6.6 Prefill: a prompt's tokens together
#
# A decoding step is a chain of matrix–vector products: every weight is loaded once and used
# for one multiply-add, 2 flops per weight. In fp32 that is 2 flops per 4 bytes, an
# *arithmetic intensity* of 0.5 flop/byte; in Q8_0 2 flops per `1 + 4/gs` bytes (1.125 with
# groups of 32), about 1.8 flop/byte. A core can do far more arithmetic per second than that
# times its memory bandwidth, so fp32 decoding waits on memory, and the best a step can do is
# bandwidth ÷ bytes per token. (int8 decoding, §6.5 showed, is held back first by its
# per-group arithmetic, which is not yet the kernel's peak either.)
#
# A prompt is different: all its tokens are known, so they can go through each layer together.
# Then each matmul is matrix–matrix, `X (T, n) @ Wᵀ`, and every weight loaded serves T tokens:
# 2T flops per weight. The *roofline* model puts the two limits in one picture: attainable
# flop/s = min(peak flop/s, intensity × bandwidth). The two meet at the *ridge point*,
# intensity = peak ÷ bandwidth: below it a kernel is memory-bound, above it compute-bound;
# batching the prompt moves prefill from the slanted part of the roof to the flat one.
#
# `csrc/prefill.c` does this in blocks of up to 64 tokens. Its kernels (`bl_matmats_f32`,
# `bl_matmats_q80` in `csrc/kernels.c`) work on a *panel* — a group of weight rows, about 64 KB,
# kept in the per-core L2 cache while all the tokens pass over it — and inside the panel on a
# *tile*, a block of rows × tokens whose sums live in registers:
#
# - fp32: 2 rows × 6 tokens, 12 accumulators; each row is walked in blocks of 512 values so
#   that the 6 tokens' slices of x stay in the small, fastest L1 cache.
# - int8: 8 rows × 5 tokens, on a copy of the 8 rows repacked so that each 8-lane vector
#   register builds the 8 rows' sums for one token, one row per lane — no adding across lanes.
#
# At 2 threads each thread takes an equal share of every matrix's rows. Attention stays per
# token and head: the block first writes all its tokens' keys and values into the cache, then
# token t attends to positions ≤ t only (causal). The classifier runs for the last token only.
# Each (row, token) sum is added in the same order as the decoding kernel's, so the logits are
# the very same numbers as token by token. We check three things: `prefill` (the last logits)
# and `forward_tokens` (all of them) against one token at a time, bit for bit, and the C int8
# prefill against NumPy's:

# %%
pf_engine = CLlama.load(files[0], threads=2)
pf_prompt = np.random.default_rng(0).integers(3, pf_engine.args.vocab_size, 100).tolist()
pf_ref = np.stack([pf_engine.forward(t, i) for i, t in enumerate(pf_prompt)])
pf_engine.reset()
pf_last = pf_engine.prefill(pf_prompt, 0)
pf_engine.reset()
pf_all = pf_engine.forward_tokens(pf_prompt, 0)
pf_np = NumpyLlama.load(files[2]).prefill(pf_prompt, 0)
pf_c8 = CLlama.load(files[2]).prefill(pf_prompt, 0)
pf_checks = [("prefill vs token by token (last logits)", np.abs(pf_last - pf_ref[-1]).max(), 0.0),
             ("forward_tokens vs token by token (all)", np.abs(pf_all - pf_ref).max(), 0.0),
             ("int8: NumPy prefill vs C prefill", np.abs(pf_np - pf_c8).max(), 1e-3)]
for what, err, bound in pf_checks:
    print(f"{what:40s} max |diff| {err:.1e} "
          f"({'must be 0' if bound == 0 else f'bound {bound:.0e}'})")
    assert err <= bound

# %% [markdown]
# How fast? The book's model fits in the caches, so for this we take the stories15M shape
# (random weights, 61 MB in fp32, the bench's files). We measure the two roofs of one core —
# its read bandwidth (the faster of a NumPy sum over 256 MB and §6.5's one-thread figure) and a
# compute peak (a large single-precision
# matrix product in NumPy's BLAS held to one thread: what a well-tuned kernel reaches) — then
# our prefill at growing batch sizes T, on one thread. A call with T tokens reads every weight
# once and does 2 flops per weight and token in the layers, and 2 per classifier weight for
# the last token only; flops ÷ weight bytes is its intensity.

# %%
# NBVAL_IGNORE_OUTPUT
def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def pf_bandwidth(mb: int = 256) -> float:
    """Bytes/s one core reads: a NumPy sum (one thread) over an array far larger than L3."""
    a = np.ones(mb << 18, dtype=np.float32)
    return a.nbytes / min(_time(a.sum) for _ in range(3))


PEAK_SCRIPT = """
import time
import numpy as np
a = np.random.default_rng(0).standard_normal(({n}, {n}), dtype=np.float32)
a @ a
times = []
for _ in range(3):
    t0 = time.perf_counter()
    a @ a
    times.append(time.perf_counter() - t0)
print(2 * {n} ** 3 / min(times))
"""


def pf_peak(n: int = 1024) -> float:
    """flop/s of a large fp32 matrix product in NumPy's BLAS on ONE thread. A BLAS reads its
    thread count when it loads, so this runs in a fresh process with the count set to 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT.format(n=n)], env=env, check=True,
                         capture_output=True, text=True)
    return float(run.stdout)


pf_files = bench_engines.make_files("stories15M")   # {0: fp32, 2: int8}; bench_engines from §6.5
bw, peak = max(pf_bandwidth(), bandwidth[1] * 1e9), pf_peak()
a_ = CLlama.load(pf_files[0], threads=1).args
kv_dim = a_.n_kv_heads * a_.head_dim
layer_weights = a_.n_layers * (2 * a_.dim * a_.dim + 2 * kv_dim * a_.dim      # wq wo, wk wv
                               + 3 * a_.dim * a_.hidden_dim)                  # w1 w2 w3
cls_weights = a_.vocab_size * a_.dim   # the classifier: read once, used for the last token only
print(f"one core: read bandwidth {bw / 1e9:.1f} GB/s, compute peak (NumPy matmul, 1 thread) "
      f"{peak / 1e9:.0f} GFLOP/s, ridge at {peak / bw:.1f} flop/byte")
pf_points = []
for v in (0, 2):
    gs = read_header(pf_files[v])[3]
    bytes_per_weight = 4.0 if v == 0 else 1 + 4 / gs   # Q8_0: a fp32 scale per group of gs
    e = CLlama.load(pf_files[v], threads=1)
    for T in (1, 2, 4, 8, 16, 32, 64):
        toks = np.random.default_rng(T).integers(3, a_.vocab_size, T).tolist()
        best = float("inf")
        for _ in range(3):
            e.reset()
            best = min(best, _time(lambda e=e, toks=toks: e.prefill(toks, 0)))
        flops = 2 * (layer_weights * T + cls_weights)
        intensity = flops / ((layer_weights + cls_weights) * bytes_per_weight)
        pf_points.append((v, T, intensity, flops / best))
        print(f"v{v} T={T:3}: intensity {intensity:6.1f} flop/byte, "
              f"{flops / best / 1e9:6.2f} GFLOP/s, {T / best:8.0f} tok/s")

# %%
# NBVAL_IGNORE_OUTPUT
fig, ax = plt.subplots(figsize=(6.5, 4))
xs = np.logspace(-1, 3, 200)
ax.plot(xs, np.minimum(peak, xs * bw) / 1e9, "k-", lw=1.5,
        label="roofline of one core (measured: read bandwidth, fp32 BLAS peak)")
ax.axvline(peak / bw, color="gray", ls=":", lw=1, label=f"ridge point ({peak / bw:.0f} flop/byte)")
for v, name, color in ((0, "fp32", "tab:blue"), (2, "int8 Q8_0", "tab:orange")):
    pts = [(i, f) for vv, _, i, f in pf_points if vv == v]
    ax.plot([i for i, _ in pts], [f / 1e9 for _, f in pts], "o-", color=color,
            label=f"our prefill, {name}, T = 1…64")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("arithmetic intensity (flop per weight byte)")
ax.set_ylabel("GFLOP/s (one thread)")
ax.set_title("Prefill on the roofline")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# At T = 1 both formats are under the slanted roof — fp32 close to it, memory-bound; int8
# further below, held back by its arithmetic as in decoding — and int8's points lie to the
# right of fp32's because the same flops need 1.125 bytes a weight instead of 4. As T grows
# each byte serves more flops and the points climb (compare the tok/s at T = 64 with T = 1 in
# the table), but they level off well below the flat roof, at a fraction of what NumPy's BLAS
# does on the same core.
#
# Why below the BLAS? Our fp32 tile does the same shape of work as a BLAS's inner kernel — 12
# accumulator registers, 8 loads for 12 FMAs — but each of our accumulators holds *one*
# output's partial sums spread over 8 lanes (the decoding kernel's order, so that prefill and
# decoding give the same bits): every output ends in a horizontal sum, and with rows of only
# 288 values (stories15M) that end is a noticeable share of the work. A BLAS is free to reorder
# the sums: each lane holds a different output (96 in the same 12 registers), no horizontal
# sums at all, and it first copies ("packs") the blocks it works on so that its loads run in
# order from L1, where ours read the weights from L2. In absolute flop/s int8 ends
# above fp32 (each byte holds four times as many weights); per byte it stays below, because
# every group of `gs` products (32 here) still ends in a conversion and two float multiplies
# per (row, token) — which is where the integer dot-product instructions below come in.
#
# `bench/bench_engines.py` prints the same comparison for the 15M and 110M shapes, batched
# against token by token, beside llama2.c, and against llama.cpp's batched prefill when
# `llama-cpp-python` is installed. Measured with it outside this notebook (AMD EPYC Zen 3,
# quiet, 5 interleaved pairs, the same threads for both, over two sessions), our prefill ÷
# llama.cpp's, at 1 and 2 threads: fp32 0.97–1.10 on a 256-token prompt of the 110M shape and
# 1.00–1.04 on 192 tokens of the 15M shape; int8 1.13–1.34 on both shapes.
#
# ## 6.7 Integer dot products: VNNI and sdot
#
# A Q8_0 group is an exact integer dot product of int8 pairs. AVX2 has no int8 × int8 multiply:
# `vpmaddubsw` multiplies *unsigned* bytes by signed ones and adds pairs into int16, then
# `vpmaddwd` against ones widens to int32. That needs a sign trick — a·b = |a| · (b with a's
# sign) — so |a| goes into the unsigned operand. Three instructions, then: multiply-add into
# int16, widen to int32, add to the accumulator. AVX-512 VNNI and AVX-VNNI fold them into one,
# `vpdpbusd`: four u8 × s8 products summed straight into each int32 lane,
# with the same sign trick; ARM's `sdot` takes signed × signed directly. `csrc/simd.h` chooses
# the path from the build target (`-march=native`) or from `-DBL_SIMD=portable|avx2|vnni|
# vnni_emul|neon|sdot`. Every path gives exactly the same int32 group sums, so the tests build
# the library once per path this CPU can run and compare the logits bit for bit; `vnni_emul`
# runs the VNNI algorithm with `vpdpbusd` written out in C, so the sign trick is checked even on
# CPUs without VNNI. Here is the instruction's arithmetic in NumPy:

# %%
def dpbusd(acc: np.ndarray, u: np.ndarray, s: np.ndarray) -> np.ndarray:
    """vpdpbusd on 8 int32 lanes: acc[l] += sum of u[4l:4l+4] (uint8) * s[4l:4l+4] (int8)."""
    return acc + (u.astype(np.int32) * s.astype(np.int32)).reshape(8, 4).sum(axis=1)


g = np.random.default_rng(1)
# quantized values lie in [-127, 127]: the sign trick negates values, and -128 has no
# positive twin in int8
a8 = g.integers(-127, 128, 32).astype(np.int8)
b8 = g.integers(-127, 128, 32).astype(np.int8)
u = np.abs(a8).astype(np.uint8)                          # |a|: fits an unsigned byte
s = np.where(a8 < 0, -b8, np.where(a8 == 0, 0, b8)).astype(np.int8)   # b with a's sign
lanes = dpbusd(np.zeros(8, dtype=np.int32), u, s)
exact = int(a8.astype(np.int32) @ b8.astype(np.int32))
print(f"sum of the 8 lanes {int(lanes.sum())}, exact a·b {exact} (must be equal)")
assert int(lanes.sum()) == exact

# %% [markdown]
# Here is `idot` from `csrc/simd.h`, all its branches: the AVX2 one with the sign trick
# (`_mm256_sign_epi8`, then `maddubs` and `madd`), the VNNI one with `vpdpbusd`, its C
# emulation, and ARM's NEON and `sdot`:

# %%
print(c_function(paths.root / "csrc" / "simd.h", "idot"))

# %%
# NBVAL_IGNORE_OUTPUT
from babyllama.fast_c import simd_path  # noqa: E402

print("this library's int8 path:", simd_path())

# %% [markdown]
# On a CPU without VNNI (AMD Zen 3, for one) this prints `avx2`: the library runs the
# three-instruction sequence, and the VNNI path above is built and checked by the tests only
# as `vnni_emul`, with `vpdpbusd` written out in C.

# %% [markdown]
# ## Exercises
#
# Solutions are in `tests/test_exercises.py`, where they are checked.
#
# 1. **Four rows at a time, in plain C.** Write `matmul4(xout, x, w, n, d)` that computes four
#    rows per pass over `x` without intrinsics (four scalar accumulators), with a loop for the
#    last `d % 4` rows. Compile it as in §6.1 and check it against NumPy for every `d` from 1
#    to 9. (Then look at what `-O3 -march=native` makes of it: `cc -S`.)
# 2. **runq.c's activation quantization.** `bl_quantize(q, s, x, n, gs)` is exported by the
#    library. Give it `argtypes` and check it against `inference_numpy.quantize_rows` bit for
#    bit, including an all-zero group and a value exactly halfway between two steps.
# 3. **Threads do not change the answer.** Show that `CLlama` with 1 and with 2 threads gives
#    bit-identical logits, token by token and for a prefilled prompt. Use a model of at least
#    2²² multiply-adds a token (e.g. dim 512, two layers, `hidden_dim` 1536): below that,
#    `work_threads` runs a token on one thread whatever you ask, and the check proves nothing.
#    Why is it so, when a parallel sum usually changes the rounding? (Hint: who computes each
#    output row, and in what order?)
