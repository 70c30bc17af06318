"""The context window over a KV cache: which tokens it holds, and the shift when it is full.

    from babyllama.context import Context
    ctx = Context(engine.prefill, engine.args.max_seq_len, n_keep=1)
    logits = ctx.feed(prompt_ids)      # the last token's logits; the cache now holds the prompt
    logits = ctx.feed([next_id])       # ... one more; past max_seq_len the window shifts

Every engine (NumPy, C, PyTorch) and the chat session use it, so they shift the same way.
When the tokens to hold would pass max_seq_len, the window keeps its first `n_keep` tokens
(BOS at least: attention leans on it), drops the oldest half of the rest, and *recomputes*
the keys and values of the tokens that moved (one prefill call).

Why recompute rather than re-rotate the cached keys by the RoPE angle of their new position
(what llama.cpp's K-shift does)? Re-rotation is exact only in layer 0: from layer 1 on, each
cached key was computed from hidden states that attended to the dropped tokens, so a re-rotated
cache is not the cache of the kept tokens — it remembers text the model can no longer see, and
no RoPE bound covers that difference. Recomputing costs a prefill of about max_seq_len/2 tokens
every max_seq_len/2 generated tokens, and gives exactly the logits of a fresh run over the kept
tokens at their new positions, which the tests check.

No torch and no NumPy here: `prefill(tokens, pos)` puts `tokens` into the cache at positions
pos .. pos+T-1 and returns the last one's logits (vocab,), in whatever array type the engine
uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Prefill = Callable[[list[int], int], Any]


def kept_after_shift(tokens: Sequence[int], n_keep: int, seq_len: int) -> list[int]:
    """The tokens a full window keeps: the first n_keep, then the newest ones after dropping
    the oldest half of the rest. The same rule truncates a prompt longer than the context."""
    n_discard = (seq_len - n_keep) // 2
    n_tail = seq_len - n_keep - n_discard   # >= 1 since n_keep <= seq_len - 2
    return [*tokens[:n_keep], *tokens[len(tokens) - n_tail:]]


def check_n_keep(n_keep: int, seq_len: int) -> None:
    """What a context that shifts needs: BOS kept at least, and one new position after a shift."""
    if seq_len < 3:
        raise ValueError(f"a context of {seq_len} positions is too short to shift (it needs 3: "
                         f"BOS, one token kept and one new): stay within it or turn the context "
                         f"shift off")
    if not 1 <= n_keep <= seq_len - 2:
        raise ValueError(f"n_keep must be in [1, {seq_len - 2}] for a context of {seq_len} "
                         f"(BOS at least, and room to shift), got {n_keep}")


def check_generate_args(n_prompt: int, steps: int, seq_len: int, context_shift: bool = True,
                        n_keep: int = 1) -> tuple[int, bool]:
    """The argument checks of every engine's generate (NumPy, C, PyTorch), made before the cache
    is touched; returns (steps, shift). `steps` counts every position, prompt included, as
    run.c's -n; with the shift off it is clamped to the context (run.c's clamp) and a longer
    prompt is an error. As the C library's bl_generate, the context shifts only when the run
    can pass the end of the context: n_keep is then checked against seq_len, and a model whose
    context is too short to shift still generates within it."""
    if n_prompt < 1:
        raise ValueError("the prompt needs at least one token (BOS = 1)")
    if not context_shift:
        if n_prompt > seq_len:
            raise ValueError(f"prompt of {n_prompt} tokens is longer than the context "
                             f"({seq_len}) and the context shift is off")
        return min(steps, seq_len), False
    if n_keep < 1:   # wrong whatever the run: the kept tokens begin with BOS
        raise ValueError(f"n_keep must be >= 1 (BOS at least), got {n_keep}")
    shift = n_prompt <= steps and steps > seq_len   # something is generated, past the end
    if shift:
        check_n_keep(n_keep, seq_len)
    return steps, shift


class Context:
    """The tokens whose keys and values sit in an engine's KV cache, at positions 0..len-1."""

    def __init__(self, prefill: Prefill, seq_len: int, n_keep: int = 1,
                 shift: bool = True, vocab_size: int | None = None):
        if shift:   # without the shift n_keep is never used (as the C context)
            check_n_keep(n_keep, seq_len)
        self.prefill, self.seq_len = prefill, seq_len
        self.n_keep, self.shift, self.vocab_size = n_keep, shift, vocab_size
        self.tokens: list[int] = []   # tokens[i] is cached at position i
        self.n_shifts = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def room(self) -> int:
        """Positions still free before the next shift."""
        return self.seq_len - len(self.tokens)

    def target(self, new: Sequence[int]) -> list[int]:
        """What the cache would hold after feeding `new` (raises if it cannot)."""
        total = [*self.tokens, *new]
        if len(total) <= self.seq_len:
            return total
        if not self.shift:
            raise ValueError(f"{len(new)} more tokens do not fit in the context: "
                             f"{len(self.tokens)} of {self.seq_len} positions are in use and "
                             f"the context shift is off")
        return kept_after_shift(total, self.n_keep, self.seq_len)

    def feed(self, new: Sequence[int]) -> Any:
        """Put `new` into the cache after the tokens already there (shifting first if they do
        not fit) and return the logits (vocab,) of the last one. A rejected call (bad id, no
        room with the shift off) changes nothing: the cache stays usable."""
        new = [int(t) for t in new]
        if not new:
            raise ValueError("feed needs at least one token")
        if self.vocab_size is not None:
            bad = [t for t in new if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        target = self.target(new)
        # positions whose token is unchanged keep their keys and values: causal attention means
        # a position depends only on the tokens up to it
        common = 0
        limit = min(len(self.tokens), len(target) - 1)   # always compute the last token
        while common < limit and self.tokens[common] == target[common]:
            common += 1
        if len(target) < len(self.tokens) + len(new):
            self.n_shifts += 1
        try:
            logits = self.prefill(target[common:], common)
        except BaseException:
            self.tokens = self.tokens[:common]   # what is past `common` may be half-written
            raise
        self.tokens = target
        return logits
