"""llama.cpp reads our GGUF files as we mean them, and how fast it runs them next to our C engine.

    python bench/bench_gguf.py --ckpt out/book/ckpt.pt --tokenizer out/tok512.model
    python bench/bench_gguf.py --speed-only --threads 1 2

Needs `llama_cpp` (pip install llama-cpp-python, which builds llama.cpp; never required by the
tests): without it the script says so and exits 0. Two parts, each a table:

1. Agreement. The book's model (--ckpt; GQA: 4 heads, 2 KV heads) and a random model of the
   stories260K shape (8 heads, 4 KV heads, weights x2 for sharp predictions) are written as
   llama2.c v0/v2 and as GGUF f32/f16/q8_0. On one token sequence, llama.cpp's logits are
   compared with PyTorch's (max |delta logit|), and llama.cpp's greedy ids (--steps new tokens)
   with those of our NumPy and C engines. f32 must agree token for token; f16 and q8_0 are
   other numbers (fp16 weights; 32-value blocks with fp16 scales, where our v2 uses 64-value
   groups with fp32 scales), so their agreement is reported, not required.
2. Speed. Our C engine (v0 fp32, v2 int8) and llama.cpp (GGUF f32, q8_0) on the same weights:
   prefill of a --prompt-len prompt (256) as one batch, then decode one token at a time, at 1
   and 2 threads; median of --repeats runs, engines interleaved. Shapes: the book's model and
   random models of the stories15M and stories110M shapes (with a 512-token context so the
   prompt fits; their GGUF vocabulary is Llama 2's tokenizer from ../shared, if present).

The CPU and its SIMD features are printed at the top. Exit status 1 if f32 disagrees.

llama-cpp-python compiles llama.cpp (~1 h on 2 busy cores); keep it out of the project's venv:
    python3 -m venv /tmp/lcpp && nice /tmp/lcpp/bin/pip install llama-cpp-python
    python -c "import site; print(site.getsitepackages()[0])" \
        > /tmp/lcpp/lib/python3.11/site-packages/zz.pth         # torch etc. from our venv
    PYTHONPATH=lib /tmp/lcpp/bin/python bench/bench_gguf.py

Measured (AMD EPYC, 2 cores, AVX2+FMA, llama-cpp-python 0.3.36; load average 13-20 from other
jobs, so absolute speeds are low and 2-thread runs are oversubscribed): f32 GGUF logits within
1e-5 of PyTorch (book 9.5e-6, GQA 260K 1.4e-6) and greedy ids identical over 64 tokens; f16
identical; q8_0 logits off by 0.17 (our int8: 0.17), ids identical on the 260K model and
parting at token 10 on the book's, where fp32 prefers the other token by 0.038. Speed, 1
thread, prefill of 256 (book: 192) tokens / decode, tok/s:
    book     C fp32 829 / 318   llama.cpp f32 1406 / 322   C int8 573 / 369   q8_0 1558 / 474
    15M      C fp32 132 / 12    llama.cpp f32  229 / 10    C int8  89 / 27    q8_0  291 / 21
    110M     C fp32  12 / 1.8   llama.cpp f32   23 / 1.9   C int8  15 / 4.8   q8_0   27 / 4.6
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
LLAMA2_TOKENIZER = ROOT.parent / "shared" / "data" / "llama2_tokenizer.model"


def cpu_header() -> str:
    import llama_cpp
    from bench_engines import cpu_info

    return f"{cpu_info()}\nllama-cpp-python {llama_cpp.__version__}"


def load_llama(path: Path, n_ctx: int, threads: int = 2, logits_all: bool = False,
               vocab_only: bool = False, kv_f32: bool = False):
    """llama.cpp's defaults, except kv_f32: its KV cache is fp16 by default (ours is fp32),
    which alone moves logits by ~1e-3; the agreement check wants the weights' error only."""
    import llama_cpp

    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if kv_f32 else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                           n_threads_batch=threads, logits_all=logits_all,
                           vocab_only=vocab_only, verbose=False, **kv)


def greedy_llama_cpp(llm, prompt: list[int], new: int) -> list[int]:
    """`new` greedy tokens after `prompt`, fewer if BOS/EOS comes first (as our loop stops)."""
    out: list[int] = []
    for t in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        if t in (1, 2):
            break
        out.append(int(t))
        if len(out) == new:
            break
    return out


def greedy_ours(engine, prompt: list[int], new: int) -> list[int]:
    # generate's steps count positions, as run.c's: the prompt's n and new - 1 more
    return list(engine.generate(prompt, len(prompt) + new - 1, temperature=0.0))


def first_difference(a: list[int], b: list[int], logits: np.ndarray | None = None,
                     offset: int = 0) -> str:
    """Where two id sequences part; with `logits` (fp32, row offset + i predicts token i), by
    how much the fp32 model preferred b's token there: a small margin is a near-tie that any
    change of arithmetic may flip."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            margin = "" if logits is None else \
                f"; fp32 margin {logits[offset + i, y] - logits[offset + i, x]:.3f}"
            return f"differ at {i} ({x} vs {y}{margin})"
    return f"identical ({len(a)})" if len(a) == len(b) else f"prefix, {len(a)} vs {len(b)}"


# ----------------------------------------------------------------------------------------------
# models: (name, Transformer, tokenizer.model)

def random_model(shape: str, scale: float = 1.0, max_seq_len: int | None = None):
    import torch

    from babyllama.model import PRESETS, Transformer

    args = PRESETS[shape]
    if max_seq_len:
        args = dataclasses.replace(args, max_seq_len=max_seq_len)
    torch.manual_seed(0)
    m = Transformer(args).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    return m


def write_files(name: str, model, tok: Path, out: Path) -> dict[str, Path]:
    from babyllama.export import write_gguf, write_model

    files = {"v0": write_model(model, out / f"{name}_v0.bin", version=0),
             "v2": write_model(model, out / f"{name}_v2.bin", version=2)}
    for dtype in ("f32", "f16", "q8_0"):
        files[dtype] = write_gguf(model, tok, out / f"{name}_{dtype}.gguf", dtype)
    return files


# ----------------------------------------------------------------------------------------------
# 1. agreement

def agreement(name: str, model, tok: Path, files: dict[str, Path], prompt: list[int],
              new: int) -> list:
    import torch

    from babyllama.fast_c import CLlama
    from babyllama.inference_numpy import NumpyLlama

    numpy_ids = greedy_ours(NumpyLlama.load(files["v0"]), prompt, new)
    seq = (prompt + numpy_ids)[:model.params.max_seq_len]
    with torch.no_grad():
        want = model(torch.tensor([seq]))[0][0].float().numpy()   # (len(seq), vocab)

    def vs_numpy(ids: list[int]) -> str:
        return first_difference(ids, numpy_ids, want, len(prompt) - 1)

    rows = [(name, "llama.cpp tokenizer", "-", tokenizer_agreement(files["f32"], tok))]
    c_ids = {}
    for v, label in (("v0", "ours C fp32 (v0)"), ("v2", "ours C int8 (v2)")):
        e = CLlama.load(files[v], threads=2)
        c_ids[v] = greedy_ours(e, prompt, new)
        e.reset()
        dlogit = float(np.abs(e.forward_tokens(seq, 0) - want).max())
        rows.append((name, label, f"{dlogit:.2e}", vs_numpy(c_ids[v])))
    for dtype in ("f32", "f16", "q8_0"):
        llm = load_llama(files[dtype], model.params.max_seq_len, logits_all=True, kv_f32=True)
        llm.reset()
        llm.eval(seq)
        dlogit = float(np.abs(np.asarray(llm.scores[:len(seq)]) - want).max())
        ids = greedy_llama_cpp(llm, prompt, new)
        rows.append((name, f"llama.cpp {dtype}", f"{dlogit:.2e}", vs_numpy(ids)))
        if dtype == "q8_0":
            rows.append((name, "llama.cpp q8_0 vs ours int8", "-",
                         first_difference(ids, c_ids["v2"])))
        del llm
    return rows


TEXTS = ["Once upon a time, there was a little girl named Lily.", "  two leading spaces",
         "trailing space ", "a\nnew line\n\nand two", "Tom said: \"No!\" 42 times.",
         "caf\u00e9 \u00fcber na\u00efve", "emoji \U0001F600 and \u6f22\u5b57"]


def tokenizer_agreement(path: Path, tok: Path) -> str:
    """llama.cpp's tokenizer from the GGUF's vocabulary vs sentencepiece's, text by text."""
    from babyllama.tokenizer import load_sentencepiece

    sp, llm = load_sentencepiece(tok), load_llama(path, 64, vocab_only=True)
    bad = [t for t in TEXTS if llm.tokenize(t.encode(), add_bos=True) != [1] + sp.encode(t)]
    return (f"identical on {len(TEXTS)} texts" if not bad else
            f"{len(bad)} of {len(TEXTS)} differ, e.g. {bad[0]!r}")


# ----------------------------------------------------------------------------------------------
# 2. speed

def time_ours(path: Path, threads: int, prompt: list[int], gen: int) -> tuple[float, float]:
    from babyllama.fast_c import CLlama

    e = CLlama.load(path, threads=threads)
    e.reset()
    t0 = time.perf_counter()
    logits = e.prefill(prompt, 0)
    pp = len(prompt) / (time.perf_counter() - t0)
    tok = int(np.argmax(logits))
    t0 = time.perf_counter()
    for i in range(gen):
        tok = int(np.argmax(e.forward(tok, len(prompt) + i)))
    return pp, gen / (time.perf_counter() - t0)


def time_llama_cpp(path: Path, threads: int, prompt: list[int], gen: int,
                   n_ctx: int) -> tuple[float, float]:
    llm = load_llama(path, n_ctx, threads)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)   # one batch (n_batch 512): llama.cpp's prompt processing
    pp = len(prompt) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(gen):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    return pp, gen / (time.perf_counter() - t0)


def speed(name: str, model, files: dict[str, Path], threads: list[int], prompt_len: int,
          gen: int, repeats: int) -> list:
    a = model.params
    T = min(prompt_len, a.max_seq_len - gen)
    prompt = [1] + np.random.default_rng(0).integers(3, a.vocab_size, T - 1).tolist()
    engines = [("ours C fp32", "v0", time_ours), ("llama.cpp f32", "f32", time_llama_cpp),
               ("ours C int8", "v2", time_ours), ("llama.cpp q8_0", "q8_0", time_llama_cpp)]
    rows = []
    for th in threads:
        runs: dict[str, list[tuple[float, float]]] = {e[0]: [] for e in engines}
        for _ in range(repeats):   # interleaved: a noisy neighbour hits every engine alike
            for label, key, fn in engines:
                extra = (a.max_seq_len,) if fn is time_llama_cpp else ()
                runs[label].append(fn(files[key], th, prompt, gen, *extra))
        for label, key, _ in engines:
            pp = statistics.median(r[0] for r in runs[label])
            tg = statistics.median(r[1] for r in runs[label])
            rows.append((name, th, label, T, pp, tg, files[key].stat().st_size / 1e6))
            print(f"  {name:12} {th} thr {label:15} prompt {T}: {pp:9.1f} tok/s, decode "
                  f"{tg:8.1f} tok/s", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------

def print_table(head: tuple[str, ...], rows: list) -> None:
    cells = [head] + [tuple(f"{c:.1f}" if isinstance(c, float) else str(c) for c in r)
                      for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    for j, r in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=str(ROOT / "out" / "book" / "ckpt.pt"))
    p.add_argument("--tokenizer", default=str(ROOT / "out" / "tok512.model"))
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--steps", type=int, default=64, help="new greedy tokens compared")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen", type=int, default=64, help="decoded tokens timed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--speed-models", nargs="*", default=["book", "stories15M", "stories110M"],
                   help="'book' and/or preset shapes (random weights, Llama 2's vocabulary)")
    p.add_argument("--llama2-tokenizer", default=str(LLAMA2_TOKENIZER))
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--agree-only", action="store_true")
    p.add_argument("--out", default=str(ROOT / "out" / "bench"))
    a = p.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama_cpp is not installed (pip install llama-cpp-python): nothing to compare")
        return 0
    from babyllama.model import Transformer
    from babyllama.tokenizer import load_sentencepiece

    print(cpu_header())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Path(a.tokenizer)
    book = Transformer.from_pretrained(a.ckpt).eval()
    models = {"book": (book, tok)}
    if not a.speed_only:
        models["260K-gqa"] = (random_model("stories260K", 2.0), tok)
    shapes = [] if a.agree_only else [m for m in a.speed_models if m != "book"]
    if shapes and not Path(a.llama2_tokenizer).exists():
        print(f"{a.llama2_tokenizer} is absent: timing the book's model only")
        shapes = []
    for shape in shapes:
        models[shape] = (random_model(shape, max_seq_len=512), Path(a.llama2_tokenizer))
    files = {name: write_files(name, m, t, out) for name, (m, t) in models.items()}
    ok = True
    if not a.speed_only:
        prompt = [1] + load_sentencepiece(tok).encode(a.prompt)
        rows = []
        for name in ("book", "260K-gqa"):
            rows += agreement(name, *models[name], files[name], prompt, a.steps)
        print(f"\nAgreement: greedy ids over {a.steps} new tokens after {a.prompt!r}, compared "
              f"with our NumPy engine (fp32); max |delta logit| against PyTorch fp32 over the "
              f"prompt and NumPy's continuation (llama.cpp with an fp32 KV cache)")
        print_table(("model", "engine", "max |dlogit|", "greedy ids vs NumPy (or tokens vs "
                     "sentencepiece)"), rows)
        ok = all(r[3].startswith("identical") for r in rows if r[1] == "llama.cpp f32")
    if not a.agree_only:
        print(f"\nSpeed: prefill of a {a.prompt_len}-token prompt (less if the context is "
              f"shorter), then {a.gen} decode steps; median of {a.repeats}")
        rows = []
        for name in [n for n in models if n in a.speed_models]:
            rows += speed(name, models[name][0], files[name], a.threads, a.prompt_len, a.gen,
                          a.repeats)
        print_table(("model", "threads", "engine", "prompt", "prefill tok/s", "decode tok/s",
                     "file MB"), rows)
    if not ok:
        print("llama.cpp's f32 greedy ids differ from ours: the GGUF file is not what we mean")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
