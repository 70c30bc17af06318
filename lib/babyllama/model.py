"""Chapter 02: Llama 2 in PyTorch, with a KV cache, and the checkpoints users already have.

    from babyllama.model import ModelArgs, Transformer, PRESETS
    model = Transformer(PRESETS["stories260K"])
    logits, loss = model(tokens, targets)               # training
    ids = model.generate([1, 403], max_new_tokens=50)   # KV-cached decoding
    model.save_pretrained("out/hf")                     # Hugging Face layout
    model = Transformer.from_pretrained("out/hf")       # ours, Hugging Face's or Meta's

Names follow Meta's reference code and llama2.c (tok_embeddings, attention.wq, feed_forward.w1,
freqs_cos, ...), so each weight has the same name here, in the exported files and in the C code.
Rotary embeddings rotate interleaved pairs (x0, x1), (x2, x3), ... as Meta and llama2.c do;
Hugging Face rotates the two halves of each head instead, so wq and wk are permuted on the way
in and out.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from babyllama.config import PRESETS, ModelArgs, count_params
from babyllama.context import Context, check_generate_args

__all__ = ["PRESETS", "ModelArgs", "Transformer", "count_params"]


# ----------------------------------------------------------------------------------------------
# the blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))   # (dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def precompute_freqs_cis(head_dim: int, end: int, theta: float = 10000.0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles pos * theta^(-2i/head_dim): each (end, head_dim/2)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim)
    angles = torch.outer(torch.arange(end).float(), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor
                     ) -> torch.Tensor:
    """Rotate each interleaved pair (x[2i], x[2i+1]) of x (B, T, H, head_dim) by its angle.

    A pair is the complex number x[2i] + i x[2i+1], and rotating it is multiplying by
    cos + i sin: (xr cos - xi sin) + i (xr sin + xi cos). One complex multiply does it in one
    kernel forward and one backward (writing out the four products and stacking them made a
    training step of the book's model 5-8% slower)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))   # (B, T, H, hd/2)
    freqs_cis = torch.complex(freqs_cos, freqs_sin)[None, :, None, :]          # (1, T, 1, hd/2)
    return torch.view_as_real(pairs * freqs_cis).flatten(-2).type_as(x)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, T, n_kv_heads, hd) -> (B, T, n_kv_heads * n_rep, hd): share each KV head."""
    return x if n_rep == 1 else torch.repeat_interleave(x, n_rep, dim=2)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.n_rep = args.n_heads // args.n_kv_heads
        kv_dim = args.n_kv_heads * args.head_dim
        self.wq = nn.Linear(args.dim, args.dim, bias=False)   # (dim, dim)
        self.wk = nn.Linear(args.dim, kv_dim, bias=False)     # (kv_dim, dim)
        self.wv = nn.Linear(args.dim, kv_dim, bias=False)     # (kv_dim, dim)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)   # (dim, dim)
        self.dropout = args.dropout
        self.use_sdpa = True
        self.cache_k: torch.Tensor | None = None   # (B, max_seq_len, n_kv_heads, head_dim)
        self.cache_v: torch.Tensor | None = None

    def forward(self, x, freqs_cos, freqs_sin, start_pos: int = 0, use_cache: bool = False):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q = apply_rotary_emb(q, freqs_cos, freqs_sin)
        k = apply_rotary_emb(k, freqs_cos, freqs_sin)
        if use_cache:   # keep k, v of every position seen so far; attend over all of them
            self.cache_k[:B, start_pos:start_pos + T] = k
            self.cache_v[:B, start_pos:start_pos + T] = v
            k = self.cache_k[:B, :start_pos + T]
            v = self.cache_v[:B, :start_pos + T]
        # the fused kernel shares each KV head among n_rep query heads itself (enable_gqa): no
        # copies of k and v, nor their sum in the backward pass; the reference path copies
        if not self.use_sdpa:
            k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # (B, heads, T, hd)
        # query t (absolute position start_pos + t) sees keys 0 .. start_pos + t
        S = k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        p = self.dropout if self.training else 0.0
        gqa = self.n_rep > 1
        if self.use_sdpa and S == T:   # plain causal: the fused kernel builds the mask itself
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                                 enable_gqa=gqa)
        elif self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                 enable_gqa=gqa)
        else:
            out = attention_explicit(q, k, v, mask, p, self.training)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


def attention_explicit(q, k, v, mask, dropout_p: float = 0.0, training: bool = False):
    """softmax(q k^T / sqrt(hd) + mask) v, written out: the reference for the fused kernel."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    att = F.dropout(F.softmax(scores.float(), dim=-1).type_as(q), dropout_p, training)
    return att @ v


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)   # (hidden_dim, dim) gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)   # (dim, hidden_dim) down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)   # (hidden_dim, dim) up
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):   # SwiGLU: w2(silu(w1 x) * w3 x)
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, args.dropout)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)   # (dim,)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)         # (dim,)
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x, freqs_cos, freqs_sin, start_pos=0, use_cache=False):
        a = self.attention(self.attention_norm(x), freqs_cos, freqs_sin, start_pos, use_cache)
        h = x + self.resid_dropout(a)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.params = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)   # (vocab_size, dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)                     # (dim,)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)  # (vocab_size, dim)
        self.output.weight = self.tok_embeddings.weight   # tied: one matrix, two roles
        freqs_cos, freqs_sin = precompute_freqs_cis(args.head_dim, args.max_seq_len,
                                                    args.rope_theta)
        self.register_buffer("freqs_cos", freqs_cos, persistent=False)
        self.register_buffer("freqs_sin", freqs_sin, persistent=False)
        self.apply(self._init_weights)
        # residual projections get a smaller init: n_layers of them add up on the residual
        for name, p in self.named_parameters():
            if name.endswith(("w3.weight", "wo.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def shared_classifier(self) -> bool:
        return self.output.weight is self.tok_embeddings.weight

    def set_sdpa(self, on: bool) -> None:
        for layer in self.layers:
            layer.attention.use_sdpa = on

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                start_pos: int = 0, use_cache: bool = False):
        """tokens (B, T) -> (logits (B, T, vocab), loss or None). With `use_cache`, tokens sit
        at positions start_pos .. start_pos + T - 1 and attend to the cached keys before them."""
        B, T = tokens.shape
        if start_pos + T > self.params.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens is longer than max_seq_len "
                             f"{self.params.max_seq_len}")
        if use_cache:
            self._ensure_cache(B, tokens.device)
        h = self.dropout(self.tok_embeddings(tokens))
        cos = self.freqs_cos[start_pos:start_pos + T]
        sin = self.freqs_sin[start_pos:start_pos + T]
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos, use_cache)
        h = self.norm(h)
        if targets is None:
            return self.output(h), None
        logits = self.output(h)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss

    def _ensure_cache(self, batch: int, device) -> None:
        a = self.params
        for layer in self.layers:
            att = layer.attention
            if att.cache_k is None or att.cache_k.shape[0] < batch:
                shape = (batch, a.max_seq_len, a.n_kv_heads, a.head_dim)
                dtype = self.tok_embeddings.weight.dtype
                att.cache_k = torch.zeros(shape, dtype=dtype, device=device)
                att.cache_v = torch.zeros(shape, dtype=dtype, device=device)

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None

    @torch.inference_mode()
    def forward_tokens(self, tokens: list[int], pos: int) -> torch.Tensor:
        """Logits (T, vocab) of tokens at positions pos .. pos+T-1 with the KV cache (batch 1):
        the engines' interface, which babyllama.context.Context drives."""
        x = torch.tensor([tokens], device=self.tok_embeddings.weight.device)
        return self(x, start_pos=pos, use_cache=True)[0][0]

    def prefill(self, tokens: list[int], pos: int) -> torch.Tensor:
        """Logits (vocab,) of the last of `tokens`; fills the KV cache for all of them."""
        return self.forward_tokens(tokens, pos)[-1]

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, context_shift: bool = True,
                 n_keep: int = 1) -> list[int]:
        """Sample up to `max_new_tokens` after the prompt with the KV cache; stops at BOS/EOS.
        Past max_seq_len the context shifts: the first n_keep tokens stay, the oldest half of
        the rest goes, the kept ones are recomputed at their new positions (babyllama.context;
        a longer prompt is truncated by the same rule). context_shift=False stops at the end
        of the context and rejects a longer prompt."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        seq_len, n = self.params.max_seq_len, len(prompt_ids)
        # the engines' checks, in their terms: steps counts every position, prompt included
        steps, shift = check_generate_args(n, n - 1 + max_new_tokens, seq_len, context_shift,
                                           n_keep)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.reset_cache()
        out: list[int] = []
        if steps < n:   # nothing to generate
            return out
        ctx = Context(self.prefill, seq_len, n_keep, shift, self.params.vocab_size)
        logits = ctx.feed(prompt_ids)
        while True:
            nxt = _sample(logits.float(), temperature, top_k, top_p, gen)
            if nxt in (1, 2):
                break
            out.append(nxt)
            if len(out) == steps - n + 1:   # the last one is not fed
                break
            logits = ctx.feed([nxt])
        self.reset_cache()
        return out

    # ------------------------------------------------------------------------------------------
    # checkpoints: ours, Hugging Face's, Meta's

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Transformer:
        from babyllama import checkpoints

        return checkpoints.load(cls, Path(path))

    def save_pretrained(self, out_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
        """config.json + model.safetensors; with `tokenizer` (a SentencePiece .model), also the
        files transformers' AutoTokenizer reads."""
        from babyllama import checkpoints
        from babyllama.tokenizer import TokenizerError, load_sentencepiece, save_hf_tokenizer

        if tokenizer is not None:   # checked before anything is written
            n = load_sentencepiece(tokenizer).vocab_size()
            if n != self.params.vocab_size:
                raise TokenizerError(f"{tokenizer}: {n} pieces, but the model's vocab_size is "
                                     f"{self.params.vocab_size}")
        out = checkpoints.save_hf(self, Path(out_dir))
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer, out)
        return out


def _sample(logits: torch.Tensor, temperature: float, top_k, top_p, gen) -> int:
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p   # the smallest set reaching top_p
        sorted_p = sorted_p * keep
        return int(idx[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))

