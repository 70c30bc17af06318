"""Every engine's generate accepts and rejects the same arguments, and generates the same tokens.

The arguments are (prompt, steps, context_shift, n_keep) against a model's max_seq_len, from
contexts too short to shift (1, 2) to a short one that shifts every token (3) and a longer one
(8): an empty prompt, a prompt of exactly the context and one past it, steps within the context,
up to its end and past it, n_keep valid and not. The rule the engines share
(babyllama.context.check_generate_args, the C library's bl_generate) is written out again here
as `expected`; the tokens are checked against a loop that knows no KV cache: it recomputes
the whole window each step and shifts it with kept_after_shift.

    PYTHONPATH=lib python -m pytest -q tests/test_generate_args.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import scaled_model, torch_threads

from babyllama.chat import TorchEngine
from babyllama.config import ModelArgs
from babyllama.context import kept_after_shift
from babyllama.export import write_model
from babyllama.fast_c import CLlama
from babyllama.inference_numpy import NumpyLlama

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4)
SEQ_LENS = (1, 2, 3, 8)
PROMPT = [1, 300, 270, 11, 42, 7, 99, 123, 250, 17]   # its first n tokens are the prompt


def expected(n: int, steps: int, seq_len: int, shift: bool, n_keep: int) -> int | str:
    """How many tokens a run generates (barring BOS/EOS), or a piece of its error message."""
    if n == 0:
        return "the prompt needs at least one token (BOS = 1)"
    if not shift:
        if n > seq_len:
            return f"prompt of {n} tokens is longer than the context ({seq_len})"
        steps = min(steps, seq_len)   # run.c's clamp
    elif n_keep < 1:
        return f"n_keep must be >= 1 (BOS at least), got {n_keep}"
    elif steps >= n and steps > seq_len:   # generates, and passes the end: the window shifts
        if seq_len < 3:
            return f"a context of {seq_len} positions is too short to shift"
        if n_keep > seq_len - 2:
            return f"n_keep must be in [1, {seq_len - 2}] for a context of {seq_len}"
    return max(0, steps - n + 1)


def _cases():
    cases = set()
    for L in SEQ_LENS:
        for n in {0, 1, L, L + 1}:
            for steps in {0, n - 1, n, L, L + 1, 3 * L} if n else {0, 3 * L}:
                for keep in {1, 0}:
                    cases.add((L, n, steps, False, keep))
                for keep in {1, 0, L - 2, L - 1}:
                    cases.add((L, n, steps, True, keep))
    return sorted(cases)


CASES = _cases()


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """Per context length: a model and each engine over it (the same weights)."""
    d, out = tmp_path_factory.mktemp("args"), {}
    for L in SEQ_LENS:
        # seed 0: greedy never meets BOS/EOS from these prompts, so every run is full length
        model = scaled_model(dataclasses.replace(ARGS, max_seq_len=L), 2.0, seed=0)
        path = write_model(model, d / f"m{L}.bin", version=0)
        out[L] = dict(model=model, numpy=NumpyLlama.load(path), c=CLlama.load(path, threads=1),
                      torch=TorchEngine(model))
    with torch_threads(1):
        yield out


def _reference(model, prompt: list[int], n_new: int, seq_len: int, n_keep: int) -> list[int]:
    """Greedy tokens without a KV cache: the whole window through the model at each step, the
    window shifted by kept_after_shift when it passes seq_len."""
    window, out = list(prompt), []
    with torch.no_grad():
        while len(out) < n_new:
            if len(window) > seq_len:
                window = kept_after_shift(window, n_keep, seq_len)
            nxt = int(model(torch.tensor([window]))[0][0, -1].argmax())
            if nxt in (1, 2):
                break
            out.append(nxt)
            window.append(nxt)
    return out


def _outcome(run):
    try:
        return run()
    except ValueError as e:
        return e


@pytest.mark.parametrize("seq_len,n,steps,shift,n_keep", CASES,
                         ids=[f"L{c[0]}-n{c[1]}-steps{c[2]}-{'shift' if c[3] else 'noshift'}-"
                              f"keep{c[4]}" for c in CASES])
def test_engines_accept_reject_and_generate_alike(engines, seq_len, n, steps, shift, n_keep):
    e, prompt = engines[seq_len], PROMPT[:n]
    want = expected(n, steps, seq_len, shift, n_keep)

    def runs(temperature: float) -> dict:
        kw = dict(context_shift=shift, n_keep=n_keep)
        return {
            "numpy": lambda: list(e["numpy"].generate(prompt, steps, temperature, 0.9, 5, **kw)),
            "c": lambda: list(e["c"].generate(prompt, steps, temperature, 0.9, 5, **kw)),
            "c native": lambda: e["c"].generate_native(prompt, steps, temperature, 0.9, 5, **kw),
            "torch engine": lambda: list(e["torch"].generate(prompt, steps, temperature, 0.9, 5,
                                                             **kw)),
            # max_new_tokens rather than steps, and torch's own sampler: greedy only
            "torch model": lambda: e["model"].generate(prompt, steps - n + 1, temperature,
                                                       seed=5, **kw),
        }

    greedy = {name: _outcome(run) for name, run in runs(0.0).items()}
    if isinstance(want, str):
        for name, got in greedy.items():
            assert isinstance(got, ValueError), f"{name} accepted what it must reject: {want}"
            assert str(got) == str(greedy["numpy"]) and want in str(got), name
        return
    ref = _reference(e["model"], prompt, want, seq_len, n_keep)
    assert len(ref) == want, "an early EOS: the counts would go unchecked"
    for name, got in greedy.items():
        assert not isinstance(got, ValueError), f"{name}: {got}"
        assert got == ref, name
    # sampled: the C engine draws NumPy's tokens exactly (the same sampler, the same seed)
    sampled = {name: runs(1.0)[name]() for name in ("numpy", "c", "c native")}
    assert sampled["c"] == sampled["numpy"] and sampled["c native"] == sampled["numpy"]
    assert len(sampled["numpy"]) <= want
