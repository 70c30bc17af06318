"""No library call may switch the caller's matplotlib backend.

A notebook shows figures inline through its own backend; a library function that calls
`matplotlib.use("Agg")` (or draws through pyplot) silently turns that off for the rest of the
kernel. Every entry point that draws is called here with a non-default backend selected, and the
backend must be the same afterwards. A file under lib/ or bench/ that mentions matplotlib but is
not exercised below fails the last test, so a new plotting function cannot slip past."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest
from test_bench import load_bench

ROOT = Path(__file__).resolve().parents[1]
COVERED = {"lib/babyllama/train.py", "bench/bench_engines.py"}
CALLER_BACKEND = "svg"   # anything but Agg, which is what a library would be tempted to set


@pytest.fixture
def caller_backend():
    before = matplotlib.get_backend()
    matplotlib.use(CALLER_BACKEND)
    yield CALLER_BACKEND
    matplotlib.use(before)


def _write_log(path: Path) -> None:
    recs = [{"iter": i, "loss": 6.0 - i / 10, "lr": 1e-3, "tokens_per_s": 1.0, "mfu": 0.1}
            for i in range(0, 30, 10)]
    recs.append({"iter": 30, "train_loss": 3.1, "val_loss": 3.2})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_plot_losses_keeps_the_backend(caller_backend, tmp_path):
    from babyllama.train import plot_losses

    _write_log(tmp_path / "log.jsonl")
    png = plot_losses(tmp_path / "log.jsonl", tmp_path / "loss.png")
    assert matplotlib.get_backend() == caller_backend
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl", "loss.png"]   # no .tmp


def test_train_keeps_the_backend(caller_backend, data_dir, tmp_path):
    """train() draws the loss curve at the end of every run."""
    from babyllama.train import TrainConfig, train

    train(TrainConfig(preset="book", out_dir=str(tmp_path), data_dir=str(data_dir),
                      vocab_size=512, max_seq_len=32, batch_size=2, max_iters=2,
                      eval_interval=0, eval_iters=1, progress=False))
    assert matplotlib.get_backend() == caller_backend
    assert (tmp_path / "loss.png").exists()


def test_bench_plot_keeps_the_backend(caller_backend, tmp_path):
    bench = load_bench()
    rows = [{"shape": "stories260K", "format": f, "engine": e, "gen_tok_s": s}
            for f, e, s in (("fp32", "C, 1 thread", 900.0), ("int8", "NumPy", 80.0))]
    vs = [{"shape": "stories260K", "format": "fp32", "threads": 1, "ratio": 1.1}]
    png = bench.plot(rows, tmp_path / "engines.png", vs_llama2c=vs)
    assert matplotlib.get_backend() == caller_backend
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pre = [{"shape": "stories15M", "format": "int8", "threads": 1, "prefill_tok_s": 900.0,
            "by_token_tok_s": 300.0, "decode_tok_s": 280.0, "memory_bound_tok_s": 1100.0}]
    png = bench.plot_prefill(pre, tmp_path / "prefill.png")
    assert matplotlib.get_backend() == caller_backend
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_file_that_draws_is_covered():
    files = [p for d in ("lib", "bench") for p in (ROOT / d).rglob("*.py")]
    draws = {str(p.relative_to(ROOT)) for p in files if "matplotlib" in p.read_text()}
    assert draws <= COVERED, f"add these to test_plots_backend.py: {sorted(draws - COVERED)}"
    for name in COVERED:
        assert "matplotlib.use(" not in (ROOT / name).read_text(), name
