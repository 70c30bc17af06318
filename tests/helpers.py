"""Helpers the test modules share (pytest puts tests/ on sys.path)."""

from __future__ import annotations

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
