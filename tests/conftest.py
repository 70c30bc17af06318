"""Shared fixtures: a small corpus, its tokenizer and shards, a briefly trained model, and the
C CLI built with AddressSanitizer + UBSan.

Everything is made here, offline, from the built-in story generator."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LLAMA2_MODEL = SHARED / "data" / "llama2_tokenizer.model"


@pytest.fixture(scope="session")
def llama2_model() -> Path:
    if not LLAMA2_MODEL.exists():
        pytest.skip(f"reference data {LLAMA2_MODEL} is absent (../shared is only beside CI "
                    f"and developer checkouts)")
    return LLAMA2_MODEL


@pytest.fixture(scope="session")
def llama2_bin(llama2_model, tmp_path_factory) -> Path:
    from babyllama.tokenizer import export_tokenizer_bin

    return export_tokenizer_bin(llama2_model, tmp_path_factory.mktemp("llama2") / "tok.bin")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A data dir with a 3,000-story built-in corpus, a 512-piece tokenizer and shards."""
    from babyllama import data as D
    from babyllama.tokenizer import export_tokenizer_bin, train_tokenizer

    d = tmp_path_factory.mktemp("data")
    D.make_corpus(n=3000, seed=0, data_dir=d)
    train, val = D.load_corpus("stories", d)
    model = train_tokenizer(train, d / "tok512", 512)
    export_tokenizer_bin(model, d / "tok512.bin")
    D.pretokenize(train, val, model, D.shard_dir("stories", 512, d), shard_stories=1000)
    return d


@pytest.fixture(scope="session")
def stories_sample(data_dir) -> list[str]:
    from babyllama import data as D

    return D.load_corpus("stories", data_dir)[0][:2000]


@pytest.fixture(scope="session")
def trained(data_dir, tmp_path_factory) -> Path:
    """A "book" model trained for 150 short steps: it already writes story-like text. Its thread
    count is pinned (train() sets every other torch global it depends on), so the weights, and
    the stories the parity tests sample from them, do not depend on which tests ran first.
    One thread: this model's matrices are too small for a second one to pay for its
    synchronisation on a 2-core machine (150 steps took 146 s with 1 thread, 679 s with 2, both
    under the same load; ~4.5 minutes with 2 on a quiet CI machine)."""
    from babyllama.train import TrainConfig, train

    out = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(preset="book", out_dir=str(out), data_dir=str(data_dir), max_iters=150,
                      batch_size=8, eval_interval=0, eval_iters=2,
                      warmup_iters=10, progress=False, threads=1)
    return train(cfg)


@pytest.fixture(scope="session")
def asan_cli(tmp_path_factory) -> Path:
    """The C CLI built with AddressSanitizer + UBSan, once a session (helpers.sanitizer_cli,
    shared with test_context_shift and test_chat); skips when the compiler has no sanitizer
    runtime."""
    from helpers import sanitizer_cli

    return sanitizer_cli(tmp_path_factory)
