"""The model's hyperparameters, importable without torch (the NumPy and C engines need them).

`ModelArgs` is re-exported by `babyllama.model`; chapter 02 explains each field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class ModelArgs:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None       # None: as many as n_heads (no grouped-query attention)
    vocab_size: int = 32000
    hidden_dim: int | None = None       # None: the multiple_of rule below
    multiple_of: int = 32
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    dropout: float = 0.0
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:   # SwiGLU has 3 matrices: 2/3 of 4*dim keeps the FLOPs of 2
            hidden = int(2 * 4 * self.dim / 3)
            m = self.multiple_of
            self.hidden_dim = m * ((hidden + m - 1) // m)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim",
                     "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelArgs.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads "
                             f"{self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelArgs:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


PRESETS = {
    "book": ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512,
                      max_seq_len=256, multiple_of=32),
    "stories260K": ModelArgs(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512,
                             max_seq_len=512, multiple_of=4),
    "stories15M": ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=32000, max_seq_len=256),
    "stories42M": ModelArgs(dim=512, n_layers=8, n_heads=8, vocab_size=32000, max_seq_len=1024),
    "stories110M": ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32000,
                             max_seq_len=1024),
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, max_seq_len=4096,
                           multiple_of=256),
}


def count_params(args: ModelArgs, shared_classifier: bool = True) -> int:
    """Parameters of a model with `args`, from the shapes alone (no allocation)."""
    kv_dim = args.n_kv_heads * args.head_dim
    per_layer = (2 * args.dim * args.dim + 2 * args.dim * kv_dim      # wq wo, wk wv
                 + 3 * args.dim * args.hidden_dim + 2 * args.dim)     # w1 w2 w3, two norms
    emb = args.vocab_size * args.dim
    return emb * (1 if shared_classifier else 2) + args.n_layers * per_layer + args.dim
