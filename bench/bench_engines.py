"""Benchmark the inference engines side by side: tokens/s, prompt processing and generation.

    python bench/bench_engines.py                       # stories260K, 15M, 110M shapes
    python bench/bench_engines.py --shapes stories260K --gen 32
    python bench/bench_engines.py --llama2c ~/llama2.c  # also time llama2.c's run/runq binaries

Models have random weights (speed does not depend on what they learned). Every engine runs in
the same process, one after the other, on the same files, so the ratios are what counts. The
table is printed and saved with a plot as bench/engines.png (+ bench/results.json; --out DIR).

Then prefill and decode tables for the C engine at 1 and --threads threads, fp32 and int8: a
256-token prompt (fewer when the context is shorter) batched against token by token, and the
decode speed beside its memory bound, bytes/token / read bandwidth at the same threads, the
bandwidth measured in the same run. Pairs are interleaved (token-by-token, batched,
token-by-token, ...) and the median ratio is reported with the spread of the pairs, so a
shared machine shows its noise.
The CPU model, its SIMD features and the library's int8 path are printed at the top. For the
book's small shape (dim 128), a table of where a token's time goes: a ctypes call, the forward
pass, the sampler, an OpenMP fork/join, and the generation loop in Python against the one in C
(median of interleaved pairs, the same tokens). With
llama-cpp-python importable, llama.cpp's prefill and decode on the same weights (GGUF) too.

--llama2c DIR: a llama2.c checkout where `run` and `runq` were built (e.g. `make runomp` and
`gcc -Ofast -fopenmp -march=native runq.c -o runq -lm`). Our CLI (csrc/run) and theirs then
sample (-p 1, one seed) from the same file with the same threads and steps, interleaved, 7 times;
both report their own "achieved tok/s", and the table gives the best of each and the median
ratio of back-to-back pairs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("BABYLLAMA_OUT") or ROOT / "out") / "bench"   # the tests: their own
TOKENIZER_MODEL = ROOT.parent / "shared" / "data" / "llama2_tokenizer.model"   # for GGUF


def seeded_model(shape: str):
    """The random model (seed 0) with a preset's shape that every engine here is given."""
    import torch

    from babyllama.model import PRESETS, Transformer

    torch.manual_seed(0)
    return Transformer(PRESETS[shape])


def make_files(shape: str) -> dict[int, Path]:
    """v0 (fp32) and v2 (int8) files of seeded_model(shape), cached."""
    from babyllama.export import write_model

    files = {v: OUT / f"{shape}_v{v}.bin" for v in (0, 2)}
    if not all(f.exists() for f in files.values()):
        model = seeded_model(shape)
        for v, f in files.items():
            write_model(model, f, version=v)
    return files


def time_engine(engine, prompt_len: int, gen: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) for an engine with the NumpyLlama interface."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, engine.args.vocab_size, prompt_len).tolist()
    prefill = engine.prefill if hasattr(engine, "prefill") else engine.forward_tokens
    prefill(prompt, 0)      # untimed: the first pass pages the weights in from the file
    engine.reset()
    time.sleep(0.3)         # the previous engine's BLAS/OpenMP threads spin a while after it
    t0 = time.perf_counter()
    prefill(prompt, 0)
    t_prompt = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(gen):
        engine.forward(int(prompt[i % prompt_len]), prompt_len + i)
    return prompt_len / t_prompt, gen / (time.perf_counter() - t0)


class TorchEngine:
    """PyTorch with its KV cache behind the engine interface (fp32)."""

    def __init__(self, path: Path, threads: int):
        import torch

        from babyllama.model import Transformer

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = Transformer.from_pretrained(path).eval()
        self.args = self.model.params

    def reset(self):
        self.model.reset_cache()

    def forward_tokens(self, tokens, pos):
        with self.torch.inference_mode():
            return self.model(self.torch.tensor([tokens]), start_pos=pos, use_cache=True)[0]

    def forward(self, token, pos):
        return self.forward_tokens([token], pos)


def run_engines(shapes: list[str], prompt_len: int, gen: int, threads: int) -> list[dict]:
    import torch

    from babyllama.fast_c import CLlama
    from babyllama.inference_numpy import NumpyLlama

    rows, saved = [], torch.get_num_threads()   # TorchEngine sets torch's process-wide count
    try:
        for shape in shapes:
            files = make_files(shape)
            for fmt, v in (("fp32", 0), ("int8", 2)):
                engines = [("C, 1 thread", lambda p: CLlama.load(p, threads=1)),
                           (f"C, {threads} threads", lambda p: CLlama.load(p, threads=threads)),
                           ("NumPy", NumpyLlama.load)]
                if fmt == "fp32":
                    engines.append((f"PyTorch, {threads} threads",
                                    lambda p: TorchEngine(p, threads)))
                for name, load in engines:
                    pp, tg = time_engine(load(files[v]), prompt_len, gen)
                    rows.append({"shape": shape, "format": fmt, "engine": name,
                                 "prompt_tok_s": pp, "gen_tok_s": tg})
                    print(f"  {shape:12} {fmt:5} {name:20} prompt {pp:9.1f} tok/s  "
                          f"generate {tg:9.1f} tok/s", flush=True)
    finally:
        torch.set_num_threads(saved)
    return rows


def cpu_info() -> str:
    """The CPU model, its SIMD features and our library's int8 path, for the table's header."""
    from babyllama.fast_c import simd_path

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni",
                        "amx_int8", "asimd", "asimddp", "sve") if f in flags]
    return (f"CPU: {model}, {os.cpu_count()} logical cores; SIMD: {' '.join(simd) or '?'}; "
            f"libbabyllama int8 path: {simd_path()}")


def read_bandwidth(threads: int, mb: int = 256, repeats: int = 5) -> float:
    """Bytes/s that `threads` threads stream from an array far bigger than the caches (best of
    `repeats`): the faster of NumPy's sum (one core) and our fp32 matvec (bl_matmul_f32, four
    rows at a time, as decoding reads weights)."""
    import ctypes

    from babyllama.fast_c import load_library

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    n = 4096
    w = np.full((mb * (1 << 20) // (4 * n), n), 0.5, dtype=np.float32)
    x, out = np.ones(n, dtype=np.float32), np.zeros(w.shape[0], dtype=np.float32)
    lib = load_library()
    f32p = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
    lib.bl_matmul_f32.argtypes = [f32p, f32p, f32p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.bl_matmul_f32.restype = None
    seconds = best(lambda: lib.bl_matmul_f32(out, x, w, n, w.shape[0], threads))
    if threads == 1:
        seconds = min(seconds, best(w.sum))
    return w.nbytes / seconds


def weight_bytes(path: Path) -> int:
    """Bytes a decode step reads: every matrix once, one embedding row (~ the file's size)."""
    return path.stat().st_size


def run_prefill_decode(shapes: list[str], threads: list[int], prompt_len: int, gen: int,
                       repeats: int, bandwidth: dict[int, float]) -> list[dict]:
    """Batched prefill vs token by token (interleaved pairs), and decode vs its memory bound
    (bandwidth[threads] / bytes per token)."""
    from babyllama.fast_c import CLlama

    rows = []
    for shape, th, (fmt, v) in itertools.product(shapes, threads, (("fp32", 0), ("int8", 2))):
        path = make_files(shape)[v]
        e = CLlama.load(path, threads=th)
        T = min(prompt_len, e.args.max_seq_len - gen)
        prompt = np.random.default_rng(0).integers(3, e.args.vocab_size, T).tolist()
        by_token, batched, decode = [], [], []
        for _ in range(repeats):
            e.reset()
            t0 = time.perf_counter()
            for i, t in enumerate(prompt):
                e.forward(t, i)
            by_token.append(T / (time.perf_counter() - t0))
            e.reset()
            t0 = time.perf_counter()
            e.prefill(prompt, 0)
            batched.append(T / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for i in range(gen):
                e.forward(prompt[i % T], T + i)
            decode.append(gen / (time.perf_counter() - t0))
        ratios = np.array(batched) / np.array(by_token)
        bound = bandwidth[th] / weight_bytes(path)
        rows.append({"shape": shape, "format": fmt, "threads": th, "prompt": T,
                     "prefill_tok_s": max(batched), "by_token_tok_s": max(by_token),
                     "prefill_ratio": float(np.median(ratios)),
                     "ratio_range": [float(ratios.min()), float(ratios.max())],
                     "decode_tok_s": max(decode), "memory_bound_tok_s": bound,
                     "mb_per_token": weight_bytes(path) / 1e6})
        r = rows[-1]
        print(f"  {shape:12} {fmt:5} {th} thr  prompt {T:4}: batched {r['prefill_tok_s']:8.1f}  "
              f"token-by-token {r['by_token_tok_s']:8.1f} tok/s  median x{r['prefill_ratio']:.2f} "
              f"[{ratios.min():.2f}-{ratios.max():.2f}]   decode {r['decode_tok_s']:8.1f} tok/s "
              f"= {r['decode_tok_s'] / bound:.0%} of {bound:.1f} "
              f"({r['mb_per_token']:.1f} MB/token)", flush=True)
    return rows


def parallel_regions(args, pos: int, int8: bool) -> int:
    """Parallel regions one token would open if split across threads: kernels.c's per-product
    rule (>= 2^16 multiply-adds, a Q8_0 row counting 16 more per group) and model.c's for
    attention ((pos + 1) * dim >= 2^13), as both read; the classifier counted too."""
    hd = args.dim // args.n_heads
    kv, h, gs = args.n_kv_heads * hd, args.hidden_dim, 64 if int8 else None

    def big(n: int, *ds: int) -> bool:
        return sum(d * (n + (16 * n // gs if gs else 0)) for d in ds) >= 1 << 16
    per_layer = (big(args.dim, args.dim, kv, kv) + ((pos + 1) * args.dim >= 1 << 13)
                 + big(args.dim, args.dim) + big(args.dim, h, h) + big(h, args.dim))
    return args.n_layers * per_layer + big(args.dim, args.vocab_size)


def _per_token_us(f) -> float:
    """Microseconds per item of f(), which returns how many items it did."""
    t0 = time.perf_counter()
    n = f()
    return (time.perf_counter() - t0) / max(n, 1) * 1e6


def _breakdown(path: Path, threads: int, repeats: int, int8: bool) -> dict:
    import ctypes

    from babyllama import fast_c
    from babyllama.fast_c import CLlama
    from babyllama.inference_numpy import XorShiftRng, generate_loop

    lib, cfg = fast_c.load_library(), np.zeros(10, dtype=np.int32)
    e = CLlama.load(path, threads=threads)
    S = e.args.max_seq_len
    gen = ([1], S, 1.0, 0.9, 7)

    def forwards() -> int:
        e.reset()
        for p in range(S):
            e.forward(5 + p, p)
        return S

    def samples() -> int:
        logits, rng = e.forward(5, 0), XorShiftRng(7)
        for _ in range(S):
            e.sample(logits, 1.0, 0.9, rng)
        return S

    def calls() -> int:
        for _ in range(1000):
            lib.bl_model_config(e._h, cfg)
        return 1000

    py = list(generate_loop(e, *gen))
    assert list(e.generate(*gen)) == py, "the C loop must draw the Python loop's tokens"
    py_us, c_us = [], []
    for _ in range(repeats):   # interleaved: a drifting machine load hits both alike
        py_us.append(_per_token_us(lambda: len(list(generate_loop(e, *gen)))))
        c_us.append(_per_token_us(lambda: len(list(e.generate(*gen)))))
    ratios = np.array(py_us) / np.array(c_us)
    return {"format": "int8" if int8 else "fp32", "threads": threads, "tokens": len(py),
            "ctypes_us": float(np.median([_per_token_us(calls) for _ in range(3)])),
            "forward_us": float(np.median([_per_token_us(forwards) for _ in range(3)])),
            "sample_us": float(np.median([_per_token_us(samples) for _ in range(3)])),
            "fork_join_us": float(np.median([lib.bl_fork_join_seconds(ctypes.c_int(threads), 50)
                                             for _ in range(21)])) * 1e6,
            "regions": parallel_regions(e.args, S // 2, int8),
            "python_loop_us": float(np.median(py_us)), "c_loop_us": float(np.median(c_us)),
            "ratio": float(np.median(ratios)),
            "ratio_range": [float(ratios.min()), float(ratios.max())]}


def token_breakdown(threads: int, repeats: int) -> list[dict]:
    """Where a token's time goes on the book's shape (dim 128, 4 layers, vocab 512), and the
    generation loop in Python (generate_loop over CLlama: a prefill call and a sampler call per
    token) against the loop in C (CLlama.generate: bl_context_generate, a call per chunk), the
    same tokens, in interleaved pairs."""
    files = make_files("book")
    rows = [_breakdown(files[v], threads, repeats, v == 2) for v in (0, 2)]
    print(f"  {'microseconds per token':46} " + "".join(f"{r['format']:>9}" for r in rows))
    lines = [("ctypes round trip (a no-op call)", "ctypes_us"),
             ("forward pass (bl_forward, with its call)", "forward_us"),
             ("sampler, top-p 0.9 (bl_sample, with its call)", "sample_us"),
             (f"OpenMP fork + join of one region, {threads} thr (median)", "fork_join_us"),
             ("Python loop: prefill + sample calls a token", "python_loop_us"),
             ("C loop: bl_context_generate, a call a chunk", "c_loop_us")]
    for label, key in lines:
        print(f"  {label:46} " + "".join(f"{r[key]:9.1f}" for r in rows))
    for r in rows:
        print(f"  {r['format']}: Python loop / C loop, median of {repeats} interleaved pairs: "
              f"x{r['ratio']:.2f} [{r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}], "
              f"{r['tokens']} tokens; split across {threads} threads a token would open "
              f"{r['regions']} parallel regions (~{r['regions'] * r['fork_join_us']:.0f} us), "
              f"so this shape runs on one (work_threads, csrc/model.h)", flush=True)
    return rows


def run_llama_cpp(shapes: list[str], threads: list[int], prompt_len: int, gen: int,
                  repeats: int) -> list[dict]:
    """llama.cpp (llama-cpp-python) on GGUF files written from the same weights, when installed:
    its prefill and ours in interleaved pairs, the same threads for both."""
    try:
        import llama_cpp
    except ImportError:
        print("  llama-cpp-python is not installed: skipped")
        return []
    try:
        from babyllama.export import write_gguf
    except ImportError:
        print("  this babyllama has no GGUF writer (babyllama.export.write_gguf): skipped")
        return []
    import sentencepiece as spm_lib

    from babyllama.fast_c import CLlama
    from babyllama.model import PRESETS

    # a GGUF carries its vocabulary: Llama 2's for the 32000-token shapes, the book's 512-piece
    # SentencePiece model (made by `make run` or chapter 01) for stories260K's
    vocabularies = {}
    for spm in (TOKENIZER_MODEL, ROOT / "out" / "tok512.model"):
        if spm.exists():
            vocabularies[spm_lib.SentencePieceProcessor(model_file=str(spm)).vocab_size()] = spm
    rows = []
    for shape in shapes:
        spm = vocabularies.get(PRESETS[shape].vocab_size)
        if spm is None:
            print(f"  {shape}: no SentencePiece model of {PRESETS[shape].vocab_size} pieces "
                  f"(looked for {TOKENIZER_MODEL} and out/tok512.model): skipped")
            continue
        for fmt, dtype in (("fp32", "f32"), ("int8", "q8_0")):
            gguf = OUT / f"{shape}_{dtype}.gguf"
            if not gguf.exists():   # the same weights as make_files' files
                write_gguf(seeded_model(shape), spm, gguf, dtype)
            ours = make_files(shape)[0 if fmt == "fp32" else 2]
            for th in threads:
                # n_threads_batch: llama-cpp-python's default is every core, whatever n_threads
                llm = llama_cpp.Llama(str(gguf), n_ctx=PRESETS[shape].max_seq_len, n_threads=th,
                                      n_threads_batch=th, n_batch=512, verbose=False)
                e = CLlama.load(ours, threads=th)
                T = min(prompt_len, PRESETS[shape].max_seq_len - gen)
                prompt = np.random.default_rng(0).integers(3, PRESETS[shape].vocab_size, T)
                pp, pp_ours = [], []
                for _ in range(repeats):   # interleaved: ours, llama.cpp, ours, ...
                    # a pause first: both engines' worker threads spin for a while after a
                    # call, and would slow down the other engine's next one
                    time.sleep(0.3)
                    e.reset()
                    t0 = time.perf_counter()
                    e.prefill(prompt.tolist(), 0)
                    pp_ours.append(T / (time.perf_counter() - t0))
                    time.sleep(0.3)
                    llm.reset()
                    t0 = time.perf_counter()
                    llm.eval(prompt.tolist())
                    pp.append(T / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                for i in range(gen):
                    llm.eval([int(prompt[i % T])])
                tg = gen / (time.perf_counter() - t0)
                ratio = float(np.median(np.array(pp_ours) / np.array(pp)))
                rows.append({"shape": shape, "format": fmt, "threads": th, "prefill_tok_s": max(pp),
                             "ours_prefill_tok_s": max(pp_ours), "prefill_ratio": ratio,
                             "decode_tok_s": tg})
                print(f"  {shape:12} {fmt:5} {th} thr  prefill {T}: llama.cpp {max(pp):8.1f}  ours "
                      f"{max(pp_ours):8.1f} tok/s  ours/llama.cpp median x{ratio:.2f}  "
                      f"llama.cpp decode {tg:8.1f} tok/s", flush=True)
    return rows


def achieved(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env)
    m = re.search(r"achieved tok/s: ([\d.]+)", r.stderr)
    if not m:
        raise RuntimeError(f"{cmd[0]} failed: {r.stderr[-500:]}")
    return float(m.group(1))


def run_vs_llama2c(llama2c: Path, shapes: list[str], threads: list[int], steps: int,
                   tok512: Path, repeats: int = 7) -> list[dict]:
    """Our CLI and llama2.c's on the same files, interleaved: best of `repeats` for each, and
    the median of the ratios of back-to-back pairs (robust to a machine whose speed drifts)."""
    subprocess.run(["make", "-s", "-C", str(ROOT / "csrc"), "run"], check=True)
    ours = str(ROOT / "csrc" / "run")
    rows = []
    for shape in shapes:
        files = make_files(shape)
        vocab = _vocab(files[0])
        tok = str(tok512 if vocab == 512 else llama2c / "tokenizer.bin")
        for th, (fmt, v, theirs) in itertools.product(
                threads, (("fp32", 0, "run"), ("int8", 2, "runq"))):
            # plain multinomial sampling (-p 1): with random weights the distribution is flat,
            # and top-p would sort ~all 32,000 probabilities each step, timing the sort instead
            # of the kernel. Both programs draw the same tokens from the same seed.
            args = [str(files[v]), "-z", tok, "-n", str(steps), "-t", "1", "-p", "1", "-s", "1"]
            pairs = [(achieved([ours, *args, "-T", str(th)], th),
                      achieved([str(llama2c / theirs), *args], th)) for _ in range(repeats)]
            best = {"ours": max(a for a, _ in pairs), "llama2.c": max(b for _, b in pairs)}
            ratio = float(np.median([a / b for a, b in pairs]))
            rows.append({"shape": shape, "format": fmt, "threads": th, **best, "ratio": ratio,
                         "ratio_best": best["ours"] / best["llama2.c"]})
            print(f"  {shape:12} {fmt:5} {th} thr  ours {best['ours']:9.1f}  llama2.c {theirs:4} "
                  f"{best['llama2.c']:9.1f}  best/best {rows[-1]['ratio_best']:.2f}  "
                  f"median pair ratio {ratio:.2f}", flush=True)
    return rows


def _vocab(path: Path) -> int:
    from babyllama.export import read_header

    return read_header(path)[0].vocab_size


def print_table(rows: list[dict]) -> None:
    print(f"\n{'shape':12} {'format':6} {'engine':22} {'prompt tok/s':>13} {'gen tok/s':>10}")
    for r in rows:
        print(f"{r['shape']:12} {r['format']:6} {r['engine']:22} {r['prompt_tok_s']:13.1f} "
              f"{r['gen_tok_s']:10.1f}")


def plot_prefill(rows: list[dict], out: Path) -> Path:
    """Prefill (batched) and token-by-token prompt speed, and decode against its memory bound."""
    from matplotlib.figure import Figure  # not pyplot: leave the caller's backend alone

    fig = Figure(figsize=(11, 0.4 * len(rows) + 1.5))
    a, b = fig.subplots(1, 2)
    labels = [f"{r['shape']} {r['format']} {r['threads']}t" for r in rows]
    y = np.arange(len(rows))
    a.barh(y + 0.2, [r["prefill_tok_s"] for r in rows], 0.4, label="batched prefill")
    a.barh(y - 0.2, [r["by_token_tok_s"] for r in rows], 0.4, label="token by token")
    b.barh(y + 0.2, [r["decode_tok_s"] for r in rows], 0.4, label="decode")
    b.barh(y - 0.2, [r["memory_bound_tok_s"] for r in rows], 0.4, color="tab:gray",
           label="bandwidth / bytes per token")
    for ax, title in ((a, "prompt tokens/s (log)"), (b, "decode tokens/s (log)")):
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def plot(rows: list[dict], out: Path, vs_llama2c: list[dict] | None = None) -> Path:
    """Generated tokens/s per engine, one panel per shape; with `vs_llama2c`, a last panel of
    our CLI's speed over llama2.c's (median pair ratio; right of the line = we are faster)."""
    import matplotlib.ticker
    from matplotlib.figure import Figure  # not pyplot: leave the caller's backend alone

    shapes = sorted({r["shape"] for r in rows}, key=[r["shape"] for r in rows].index)
    panels = len(shapes) + (1 if vs_llama2c else 0)
    fig = Figure(figsize=(5 * panels, 3.6))
    axes = fig.subplots(1, panels, squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sub = [r for r in rows if r["shape"] == shape]
        labels = [f"{r['engine']}\n{r['format']}" for r in sub]
        ax.barh(labels, [r["gen_tok_s"] for r in sub], color=[
            "tab:blue" if r["engine"].startswith("C") else "tab:gray" for r in sub])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("generated tokens/s (log)")
        ax.set_title(shape)
        ax.tick_params(axis="y", labelsize=7)
    if vs_llama2c:
        ax = axes[0][-1]
        labels = [f"{r['shape']} {r['format']}, {r['threads']} thr" for r in vs_llama2c]
        ratios = [r["ratio"] for r in vs_llama2c]
        ax.barh(labels, ratios, color=["tab:blue" if x >= 1 else "tab:red" for x in ratios])
        ax.axvline(1.0, color="black", lw=1)
        ax.set_xlabel("our CLI / llama2.c (tok/s)")
        ax.set_title("vs llama2.c run / runq")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["stories260K", "stories15M", "stories110M"])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--prefill-prompt", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="interleaved pairs per prefill figure")
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--llama2c", type=Path, default=None)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--tokenizer", type=Path, default=ROOT / "out" / "tok512.bin",
                   help="tokenizer.bin for 512-piece shapes (stories260K), made by chapter 01")
    p.add_argument("--out", type=Path, default=ROOT / "bench", help="where results go")
    a = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    print(cpu_info())
    bandwidth = {th: read_bandwidth(th) for th in sorted({1, a.threads})}
    print("read bandwidth (256 MB, the faster of NumPy's sum and our fp32 matvec): " +
          ", ".join(f"{bw / 1e9:.1f} GB/s at {th} thread{'s' * (th > 1)}"
                    for th, bw in bandwidth.items()))
    print("engines, side by side:")
    rows = run_engines(a.shapes, a.prompt, a.gen, a.threads)
    print_table(rows)
    results = {"cpu": cpu_info(), "read_bandwidth": bandwidth, "engines": rows}
    threads = sorted({1, a.threads})
    print(f"\nsmall model (book shape): where a token's time goes, {a.threads} threads:")
    results["token_breakdown"] = token_breakdown(a.threads, a.repeats)
    print(f"\nC engine: prefill (batched vs token by token, {a.repeats} interleaved pairs) and "
          f"decode vs memory bound:")
    results["prefill"] = run_prefill_decode(a.shapes, threads, a.prefill_prompt, a.gen,
                                            a.repeats, bandwidth)
    print("\nllama.cpp:")
    results["llama_cpp"] = run_llama_cpp(a.shapes, threads, a.prefill_prompt, a.gen, a.repeats)
    if a.llama2c:
        print(f"\nour CLI vs llama2.c ({a.steps} steps, 7 interleaved runs each):")
        results["llama2c"] = run_vs_llama2c(a.llama2c, a.shapes, sorted({1, a.threads}),
                                            a.steps, a.tokenizer)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nplot: {plot(rows, a.out / 'engines.png', results.get('llama2c'))}")
    print(f"plot: {plot_prefill(results['prefill'], a.out / 'prefill.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
