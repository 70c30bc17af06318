"""The benchmark script runs end to end and prints its tables (timings are never asserted).

The llama2.c comparison is exercised with our own CLI standing in for llama2.c's `run` and
`runq` (same flags, same "achieved tok/s" line), so its plumbing is tested offline."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_engines",
                                                  ROOT / "bench" / "bench_engines.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_prints_tables_and_saves_plot(data_dir, tmp_path, capsys):
    bench = load_bench()
    subprocess.run(["make", "-s", "-C", str(ROOT / "csrc"), "run"], check=True)
    fake = tmp_path / "llama2c"
    fake.mkdir()
    for name in ("run", "runq"):
        shutil.copy(ROOT / "csrc" / "run", fake / name)
    out = tmp_path / "results"
    rc = bench.main(["--shapes", "stories260K", "--prompt", "4", "--gen", "4", "--threads", "2",
                     "--steps", "24", "--repeats", "1", "--prefill-prompt", "16",
                     "--llama2c", str(fake), "--out", str(out),
                     "--tokenizer", str(data_dir / "tok512.bin")])
    assert rc == 0
    text = capsys.readouterr().out
    for engine in ("C, 1 thread", "C, 2 threads", "NumPy", "PyTorch, 2 threads"):
        assert f"stories260K  fp32   {engine}" in text
    assert "stories260K  int8   C, 2 threads" in text
    results = json.loads((out / "results.json").read_text())
    assert len(results["engines"]) == 7   # 4 fp32 engines + 3 int8 (PyTorch has no int8)
    assert all(r["gen_tok_s"] > 0 and r["prompt_tok_s"] > 0 for r in results["engines"])
    vs = results["llama2c"]
    assert [(r["threads"], r["format"]) for r in vs] == [(1, "fp32"), (1, "int8"),
                                                         (2, "fp32"), (2, "int8")]
    assert all(r["ours"] > 0 and r["llama2.c"] > 0 and r["ratio"] > 0 for r in vs)
    assert (out / "engines.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
