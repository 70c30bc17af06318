"""llama.cpp reads our GGUF files as we mean them: greedy ids from llama-cpp-python vs ours.

    python bench/bench_gguf.py                          # the book's model (out/book/ckpt.pt)
    python bench/bench_gguf.py --ckpt CKPT --tokenizer TOK.model --steps 64

Needs `llama_cpp` (pip install llama-cpp-python; never required by the tests): without it the
script says so and exits 0. Writes the checkpoint as llama2.c v0 and as GGUF (f32 and q8_0),
decodes greedily from the same prompt ids with our NumPy and C engines and with llama.cpp, and
prints where the id sequences first differ. f32 GGUF should agree with our engines token for
token; q8_0 may drift after a while (a different quantization), which is printed, not failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def greedy_llama_cpp(path: Path, prompt: list[int], steps: int, n_ctx: int) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=n_ctx, verbose=False)
    out: list[int] = []
    for t in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        if t in (1, 2) or len(prompt) + len(out) >= steps:
            break
        out.append(int(t))
    return out


def first_difference(a: list[int], b: list[int]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"differ at token {i} ({x} vs {y})"
    return "identical" if len(a) == len(b) else f"same prefix, lengths {len(a)} vs {len(b)}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=str(ROOT / "out" / "book" / "ckpt.pt"))
    p.add_argument("--tokenizer", default=str(ROOT / "out" / "tok512.model"))
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "out" / "bench"))
    a = p.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama_cpp is not installed (pip install llama-cpp-python): nothing to compare")
        return 0
    from babyllama.export import write_gguf, write_model
    from babyllama.fast_c import CLlama
    from babyllama.inference_numpy import NumpyLlama
    from babyllama.model import Transformer
    from babyllama.tokenizer import load_sentencepiece

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Transformer.from_pretrained(a.ckpt).eval()
    prompt = [1] + load_sentencepiece(a.tokenizer).encode(a.prompt)
    v0 = write_model(model, out / "gguf_check_v0.bin")
    ours = {name: list(cls.load(str(v0)).generate(prompt, a.steps, temperature=0.0))
            for name, cls in (("numpy", NumpyLlama), ("c", CLlama))}
    print(f"numpy vs c: {first_difference(ours['numpy'], ours['c'])}")
    for dtype in ("f32", "q8_0"):
        g = write_gguf(model, a.tokenizer, out / f"gguf_check_{dtype}.gguf", dtype)
        ids = greedy_llama_cpp(g, prompt, a.steps, model.params.max_seq_len)
        print(f"llama.cpp {dtype} vs numpy: {first_difference(ids, ours['numpy'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
