"""The book's artifacts, made once and reused: every chapter (and `babyllama book`) calls these.

    from babyllama.book import Paths, ensure_model
    p = Paths.find()            # out/ beside pyproject.toml, wherever the notebook runs
                                # (or $BABYLLAMA_OUT: the tests' own directory)
    ckpt = ensure_model(p)      # trains the 'book' preset if out/book/ckpt.pt is missing

A chapter run on its own builds what earlier chapters would have built; run in order, each
reuses the previous chapter's files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# where the artifacts go instead of out/ when set: `make test` points it at a directory of its
# own, so the tests never overwrite what `make run` made
OUT_ENV = "BABYLLAMA_OUT"
VOCAB = 512
BOOK_ITERS = 300           # x 8 windows x 256 tokens = 614k tokens: about a minute on 2 cores
BOOK_BATCH = 8             # for a fixed number of tokens, more and smaller steps learn faster
BOOK_WARMUP = 20           # chapter 03 stops at iteration 20 to show an early sample, then
                           # resumes: as long as 20 <= warmup, that equals one straight run
BOOK_SEED = 0
FINETUNE_ITERS = 1800      # x 4 requests, 9 in 10 steps on the opening only (~760k tokens)
# both cores of the book's 2-core budget, as pretraining: 1.27x faster than one when the machine
# is otherwise idle (train.FinetuneConfig says why one is the default)
FINETUNE_THREADS = min(2, os.cpu_count() or 1)
# three requests whose (name, animal, object) never occur in the fine-tuning data
BOOK_REQUESTS = ["Tell me a story about a shy fox named Max who finds a red lantern.",
                 "Write a story about Lily, a curious owl who finds a blue teapot.",
                 "Can you tell me a story about a brave penguin called Ben? He finds a tiny map."]
BOOK_REQUEST_DETAILS = [("Max", "fox", "lantern"), ("Lily", "owl", "teapot"),
                        ("Ben", "penguin", "map")]   # what an answer must name


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def find(cls, start: Path | None = None) -> Paths:
        start = (start or Path.cwd()).resolve()
        for p in (start, *start.parents):
            if (p / "pyproject.toml").exists() and (p / "lib" / "babyllama").exists():
                return cls(p)
        return cls(start)

    @property
    def out(self) -> Path:
        return Path(os.environ[OUT_ENV]).resolve() if os.environ.get(OUT_ENV) else \
            self.root / "out"

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def tok_model(self) -> Path:
        return self.out / f"tok{VOCAB}.model"

    @property
    def tok_bin(self) -> Path:
        return self.out / f"tok{VOCAB}.bin"

    @property
    def run_dir(self) -> Path:
        return self.out / "book"

    @property
    def ckpt(self) -> Path:
        return self.run_dir / "ckpt.pt"

    def model_bin(self, version: int) -> Path:
        return self.out / f"book_v{version}.bin"

    @property
    def ft_dir(self) -> Path:
        return self.out / "finetune"

    @property
    def ft_ckpt(self) -> Path:
        return self.ft_dir / "ckpt.pt"

    @property
    def chat_bin(self) -> Path:
        return self.out / "book_chat.bin"


def ensure_tokenizer(p: Paths) -> Path:
    """Chapter 01's vocabulary: 512 pieces trained on the built-in corpus (its stories and
    chat-rendered requests: data.tokenizer_docs), and tokenizer.bin."""
    from babyllama import data as D
    from babyllama.tokenizer import export_tokenizer_bin, train_tokenizer

    if not p.tok_model.exists():
        train, _ = D.load_corpus("stories", p.data)
        train_tokenizer(D.tokenizer_docs(train), p.tok_model.with_suffix(""), VOCAB)
    if not p.tok_bin.exists():
        export_tokenizer_bin(p.tok_model, p.tok_bin)
    return p.tok_bin


def ensure_shards(p: Paths, progress: bool = True) -> Path:
    from babyllama import data as D

    ensure_tokenizer(p)
    bins = D.shard_dir("stories", VOCAB, p.data)
    if not (bins / "meta.json").exists():
        train, val = D.load_corpus("stories", p.data)
        D.pretokenize(train, val, p.tok_model, bins, progress=progress)
    return bins


def book_config(p: Paths, **overrides):
    from babyllama.train import TrainConfig

    cfg = dict(preset="book", out_dir=str(p.run_dir), data_dir=str(p.data), vocab_size=VOCAB,
               batch_size=BOOK_BATCH, max_iters=BOOK_ITERS, eval_interval=50, eval_iters=4,
               warmup_iters=BOOK_WARMUP, seed=BOOK_SEED)
    cfg.update(overrides)
    return TrainConfig(**cfg)


def ensure_model(p: Paths, progress: bool = True) -> Path:
    """Chapter 03's model: the 'book' preset trained on the built-in corpus."""
    from babyllama.train import train

    ensure_shards(p, progress)
    if not p.ckpt.exists():
        train(book_config(p, progress=progress))
    return p.ckpt


def ensure_exports(p: Paths) -> dict[int, Path]:
    """Chapter 04's files: the trained model as llama2.c v0, v1 and v2."""
    from babyllama.export import write_model
    from babyllama.model import Transformer

    ckpt = ensure_model(p, progress=False)
    missing = [v for v in (0, 1, 2) if not p.model_bin(v).exists()
               or p.model_bin(v).stat().st_mtime < ckpt.stat().st_mtime]
    if missing:
        model = Transformer.from_pretrained(ckpt)
        for v in missing:
            write_model(model, p.model_bin(v), version=v)
    return {v: p.model_bin(v) for v in (0, 1, 2)}


def ensure_finetuned(p: Paths, progress: bool = True, max_iters: int = FINETUNE_ITERS) -> Path:
    """Chapter 05's instruction-tuned model (from the book model), exported as llama2.c v0."""
    from babyllama.export import write_model
    from babyllama.model import Transformer
    from babyllama.train import finetune

    ckpt = ensure_model(p, progress)
    if not p.ft_ckpt.exists() or p.ft_ckpt.stat().st_mtime < ckpt.stat().st_mtime:
        finetune(ckpt, p.ft_dir, p.tok_bin, max_iters=max_iters, progress=progress,
                 threads=FINETUNE_THREADS)
    if not p.chat_bin.exists() or p.chat_bin.stat().st_mtime < p.ft_ckpt.stat().st_mtime:
        write_model(Transformer.from_pretrained(p.ft_ckpt), p.chat_bin, version=0)
    return p.chat_bin
