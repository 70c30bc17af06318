"""Helpers the test modules share (pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import torch

from babyllama.model import ModelArgs, Transformer


def scaled_model(args: ModelArgs, scale: float = 1.0, seed: int = 0) -> Transformer:
    """A random model in eval mode with every weight multiplied by `scale`: larger weights make
    sharper, more varied predictions than the 0.02-std initialisation."""
    torch.manual_seed(seed)
    m = Transformer(args).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    return m


def small_run(data_dir, out, **kw):
    """A TrainConfig for a short, quick stories260K run on the session's shards (64-token
    windows, every step logged, no progress bar); keyword arguments override any field."""
    from babyllama.train import TrainConfig

    base = dict(preset="stories260K", out_dir=str(out), data_dir=str(data_dir), max_seq_len=64,
                batch_size=4, max_iters=20, lr_decay_iters=20, warmup_iters=3, eval_interval=0,
                eval_iters=2, log_interval=1, progress=False, dropout=0.1)
    base.update(kw)
    return TrainConfig(**base)


def logged_losses(out) -> list[float]:
    """The training loss of every logged step of the run in `out`."""
    from babyllama.train import read_log

    return [r["loss"] for r in read_log(Path(out) / "log.jsonl") if "loss" in r]


def checkpoint_weights(path) -> dict:
    return torch.load(path, weights_only=True)["model"]
