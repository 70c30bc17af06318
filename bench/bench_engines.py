"""Benchmark the inference engines side by side: tokens/s, prompt processing and generation.

    python bench/bench_engines.py                       # stories260K, 15M, 110M shapes
    python bench/bench_engines.py --shapes stories260K --gen 32
    python bench/bench_engines.py --llama2c ~/llama2.c  # also time llama2.c's run/runq binaries

Models have random weights (speed does not depend on what they learned). Every engine runs in
the same process, one after the other, on the same files, so the ratios are what counts. The
table is printed and saved with a plot as bench/engines.png (+ bench/results.json; --out DIR).

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
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("BABYLLAMA_OUT") or ROOT / "out") / "bench"   # the tests: their own


def make_files(shape: str) -> dict[int, Path]:
    """v0 (fp32) and v2 (int8) files of a random model with a preset's shape, cached."""
    import torch

    from babyllama.export import write_model
    from babyllama.model import PRESETS, Transformer

    files = {v: OUT / f"{shape}_v{v}.bin" for v in (0, 2)}
    if not all(f.exists() for f in files.values()):
        torch.manual_seed(0)
        model = Transformer(PRESETS[shape])
        for v, f in files.items():
            write_model(model, f, version=v)
    return files


def time_engine(engine, prompt_len: int, gen: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) for an engine with the NumpyLlama interface."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, engine.args.vocab_size, prompt_len).tolist()
    engine.reset()
    t0 = time.perf_counter()
    engine.forward_tokens(prompt, 0)
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
    from babyllama.fast_c import CLlama
    from babyllama.inference_numpy import NumpyLlama

    rows = []
    for shape in shapes:
        files = make_files(shape)
        for fmt, v in (("fp32", 0), ("int8", 2)):
            engines = [("C, 1 thread", lambda p: CLlama.load(p, threads=1)),
                       (f"C, {threads} threads", lambda p: CLlama.load(p, threads=threads)),
                       ("NumPy", NumpyLlama.load)]
            if fmt == "fp32":
                engines.append((f"PyTorch, {threads} threads", lambda p: TorchEngine(p, threads)))
            for name, load in engines:
                pp, tg = time_engine(load(files[v]), prompt_len, gen)
                rows.append({"shape": shape, "format": fmt, "engine": name, "prompt_tok_s": pp,
                             "gen_tok_s": tg})
                print(f"  {shape:12} {fmt:5} {name:20} prompt {pp:9.1f} tok/s  "
                      f"generate {tg:9.1f} tok/s", flush=True)
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


def plot(rows: list[dict], out: Path, vs_llama2c: list[dict] | None = None) -> Path:
    """Generated tokens/s per engine, one panel per shape; with `vs_llama2c`, a last panel of
    our CLI's speed over llama2.c's (median pair ratio; right of the line = we are faster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in rows}, key=[r["shape"] for r in rows].index)
    panels = len(shapes) + (1 if vs_llama2c else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
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
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=["stories260K", "stories15M", "stories110M"])
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--llama2c", type=Path, default=None)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--tokenizer", type=Path, default=ROOT / "out" / "tok512.bin",
                   help="tokenizer.bin for 512-piece shapes (stories260K), made by chapter 01")
    p.add_argument("--out", type=Path, default=ROOT / "bench", help="where results go")
    a = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    print("engines, side by side:")
    rows = run_engines(a.shapes, a.prompt, a.gen, a.threads)
    print_table(rows)
    results = {"engines": rows}
    if a.llama2c:
        print(f"\nour CLI vs llama2.c ({a.steps} steps, 7 interleaved runs each):")
        results["llama2c"] = run_vs_llama2c(a.llama2c, a.shapes, sorted({1, a.threads}),
                                            a.steps, a.tokenizer)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nplot: {plot(rows, a.out / 'engines.png', results.get('llama2c'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
