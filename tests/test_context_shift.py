"""Generation past max_seq_len: the context shift of babyllama.context in all three engines.

The shift keeps the first n_keep tokens, drops the oldest half of the rest and recomputes the
kept ones at their new positions, so after each shift the logits must equal a fresh run over
the kept tokens, and the engines must agree with each other through several shifts."""

from __future__ import annotations

import dataclasses
import os
import subprocess

import numpy as np
import pytest
import torch
from helpers import (
    SANITIZER_ENV,
    assert_sanitizer_clean,
    build_cli,
    sanitizer_cli,
    scaled_model,
    torch_threads,
)

from babyllama.context import Context, kept_after_shift
from babyllama.export import write_model
from babyllama.fast_c import CLlama
from babyllama.inference_numpy import NumpyLlama
from babyllama.model import PRESETS

SEQ = 40   # a short context: 3 x SEQ tokens cross several shifts in well under a second


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("shift")
    args = dataclasses.replace(PRESETS["stories260K"], max_seq_len=SEQ)
    model = scaled_model(args, 2.0, seed=3)
    return model, {v: write_model(model, d / f"m_v{v}.bin", version=v) for v in (0, 2)}


def test_kept_after_shift_by_hand():
    toks = list(range(10))
    # seq_len 10, n_keep 2: 8 others, drop the oldest 4, keep the newest 4
    assert kept_after_shift(toks, 2, 10) == [0, 1, 6, 7, 8, 9]
    assert kept_after_shift([*toks, 10], 1, 10) == [0, 6, 7, 8, 9, 10]   # 9 others: drop 4
    # a prompt far longer than the context keeps the same count: head + newest tail
    assert kept_after_shift(list(range(100)), 1, 10) == [0, 95, 96, 97, 98, 99]


@pytest.mark.parametrize("version,temperature,seed", [(0, 0.0, 1), (0, 1.0, 5), (0, 0.9, 4),
                                                     (2, 0.0, 1)])
def test_numpy_and_c_agree_over_three_contexts(files, version, temperature, seed):
    path = files[1][version]
    prompt = [1, 300, 270, 11]
    ref = list(NumpyLlama.load(path).generate(prompt, 3 * SEQ, temperature, 0.9, seed))
    out = list(CLlama.load(path, threads=2).generate(prompt, 3 * SEQ, temperature, 0.9, seed))
    assert out == ref
    assert len(ref) == 3 * SEQ - len(prompt) + 1, "the run must cross several shifts"


def test_generate_runs_past_the_context_exactly_steps(files):
    eng = NumpyLlama.load(files[1][0])
    # greedy from this prompt never hits BOS/EOS: steps - len(prompt) + 1 tokens, as run.c counts
    out = list(eng.generate([1, 300], 3 * SEQ, temperature=0.0))
    assert len(out) == 3 * SEQ - 1
    clamped = list(eng.generate([1, 300], 3 * SEQ, temperature=0.0, context_shift=False))
    assert len(clamped) == SEQ - 1 and out[:SEQ - 1] == clamped


def _greedy_run(engine, prompt, n, n_keep=1):
    """Feed greedy tokens through a Context; (logits after each feed, shift flags, contexts)."""
    ctx = Context(engine.prefill, SEQ, n_keep, True, engine.args.vocab_size)
    logits, out = [np.asarray(ctx.feed(prompt), dtype=np.float32)], []
    for _ in range(n):
        shifts = ctx.n_shifts
        logits.append(np.asarray(ctx.feed([int(np.argmax(logits[-1]))]), dtype=np.float32))
        out.append((ctx.n_shifts > shifts, list(ctx.tokens)))
    return logits, out


@pytest.mark.parametrize("n_keep", [1, 5])
def test_after_a_shift_logits_equal_a_fresh_run(files, n_keep):
    path = files[1][0]
    for engine, fresh in ((NumpyLlama.load(path), NumpyLlama.load(path)),
                          (CLlama.load(path, threads=2), CLlama.load(path, threads=1))):
        logits, steps = _greedy_run(engine, [1, 300, 270, 11, 42, 7], 2 * SEQ, n_keep)
        shifted = [i for i, (s, _) in enumerate(steps) if s]
        assert len(shifted) >= 3
        for i in shifted:
            kept = steps[i][1]
            assert len(kept) == n_keep + (SEQ - n_keep) - (SEQ - n_keep) // 2
            fresh.reset()
            ref = fresh.forward_tokens(kept, 0)[-1]
            assert np.abs(logits[i + 1] - ref).max() <= 1e-4


def test_pytorch_logits_agree_after_each_shift(files):
    model, paths = files
    np_logits, np_steps = _greedy_run(NumpyLlama.load(paths[0]), [1, 300, 270], 2 * SEQ)
    model.reset_cache()
    t_logits, t_steps = _greedy_run_torch(model, [1, 300, 270], 2 * SEQ)
    assert [s for s in t_steps] == [s for s in np_steps]   # same tokens, same shifts
    shifted = [i for i, (s, _) in enumerate(np_steps) if s]
    assert len(shifted) >= 3
    diff = [np.abs(t_logits[i + 1] - np_logits[i + 1]).max() for i in shifted]
    assert max(diff) <= 1e-4
    assert np.abs(np.stack(t_logits) - np.stack(np_logits)).max() <= 1e-4
    # and generate() itself: greedy tokens equal NumPy's over 3 contexts
    prompt = [1, 300, 270]
    ref = list(NumpyLlama.load(paths[0]).generate(prompt, 3 * SEQ, temperature=0.0))
    assert model.generate(prompt, 3 * SEQ - len(prompt) + 1, temperature=0.0) == ref
    assert model.generate(prompt, 3 * SEQ, temperature=0.0, context_shift=False) == \
        ref[:SEQ - len(prompt) + 1]


def _greedy_run_torch(model, prompt, n):
    class Engine:
        args = model.params

        def prefill(self, tokens, pos):
            return model.prefill(tokens, pos).float().numpy()
    return _greedy_run(Engine(), prompt, n)


def test_long_prompt_is_truncated_or_rejected(files):
    path = files[1][0]
    eng = NumpyLlama.load(path)
    prompt = [1, *np.random.default_rng(0).integers(3, 512, 3 * SEQ).tolist()]
    with pytest.raises(ValueError, match="longer than the context"):
        list(eng.generate(prompt, 4 * SEQ, temperature=0.0, context_shift=False))
    # with the shift on it keeps BOS and its newest tokens, the rule documented in
    # babyllama.context: the same tokens as generating from the truncated prompt
    kept = kept_after_shift(prompt, 1, SEQ)
    assert kept[0] == 1 and kept[1:] == prompt[len(prompt) - len(kept) + 1:]
    a = list(eng.generate(prompt, len(prompt) + 5, temperature=0.0))
    b = list(eng.generate(kept, len(kept) + 5, temperature=0.0))
    assert a == b and len(a) == 6


@pytest.mark.parametrize("engine_cls", [NumpyLlama, CLlama])
def test_a_rejected_step_leaves_the_cache_usable(files, engine_cls):
    path = files[1][0]
    eng = engine_cls.load(path)
    ctx = Context(eng.prefill, SEQ, 1, shift=False, vocab_size=eng.args.vocab_size)
    ctx.feed(list(range(1, SEQ - 1)))
    with pytest.raises(ValueError, match="do not fit in the context"):
        ctx.feed([5, 6, 7])
    with pytest.raises(ValueError, match="token id 512 outside the vocabulary"):
        ctx.feed([5, 512])
    with pytest.raises(ValueError, match="n_keep"):
        Context(eng.prefill, SEQ, n_keep=SEQ - 1)
    assert len(ctx) == SEQ - 2
    got = ctx.feed([5, 6])   # exactly fills the context
    fresh = NumpyLlama.load(path)
    ref = fresh.forward_tokens([*range(1, SEQ - 1), 5, 6], 0)[-1]
    assert np.abs(got - ref).max() <= 1e-4
    with pytest.raises(ValueError, match="outside the context"):
        eng.forward(1, SEQ)   # the engines themselves still refuse a position past the end


def test_torch_generate_bad_arguments(files):
    model = files[0]
    with pytest.raises(ValueError, match="longer than the context"):
        model.generate([1] * (SEQ + 1), 5, context_shift=False)
    with pytest.raises(ValueError, match="n_keep"):
        model.generate([1, 2], 5, n_keep=0)
    assert torch.is_grad_enabled()


# ----------------------------------------------------------------------------------------------
# the C CLI's generate mode (./csrc/run -n past the context, -k kept tokens, -k 0 = clamp)

@pytest.fixture(scope="module")
def run_exe():
    return build_cli()


def _cli_ids(exe, model, tok, dump, *flags, env=None) -> tuple[list[int], list[int], str]:
    """(prompt ids, generated ids, stderr) of one generate run, from BABYLLAMA_DUMP_IDS."""
    env = {**os.environ, **(env or {}), "BABYLLAMA_DUMP_IDS": str(dump)}
    r = subprocess.run([str(exe), str(model), "-z", str(tok), "-i", "Once upon a time", *flags],
                       capture_output=True, text=True, errors="replace", env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    first, *rest = dump.read_text().splitlines()
    return [int(t) for t in first.split()], [int(t) for t in rest], r.stderr


@pytest.mark.parametrize("version,temperature,seed,n_keep", [
    (0, 0.0, 1, 1), (0, 1.0, 5, 1), (0, 0.9, 4, 4), (2, 0.0, 1, 1), (2, 1.0, 3, 2)])
def test_cli_generates_past_the_context_as_numpy(files, run_exe, data_dir, tmp_path, version,
                                                 temperature, seed, n_keep):
    path, crossed = files[1][version], False
    # a sampled story may end at EOS early: further seeds until one runs over 3 contexts
    for s in range(seed, seed + 8):
        prompt, ids, _ = _cli_ids(run_exe, path, data_dir / "tok512.bin", tmp_path / "ids",
                                  "-n", str(3 * SEQ), "-t", str(temperature), "-p", "0.9",
                                  "-s", str(s), "-k", str(n_keep))
        ref = list(NumpyLlama.load(path).generate(prompt, 3 * SEQ, temperature, 0.9, s,
                                                  n_keep=n_keep))
        assert ids == ref
        if len(ref) == 3 * SEQ - len(prompt) + 1:
            crossed = True
            break
    assert crossed, "no run crossed several shifts"
    assert ids == list(CLlama.load(path, threads=2).generate(prompt, 3 * SEQ, temperature, 0.9,
                                                             s, n_keep=n_keep))


def test_cli_k0_clamps_at_the_context_as_run_c(files, run_exe, data_dir, tmp_path):
    path = files[1][0]
    prompt, ids, _ = _cli_ids(run_exe, path, data_dir / "tok512.bin", tmp_path / "ids",
                              "-n", str(3 * SEQ), "-t", "0", "-k", "0")
    ref = list(NumpyLlama.load(path).generate(prompt, 3 * SEQ, 0.0, context_shift=False))
    assert ids == ref and len(ids) == SEQ - len(prompt) + 1
    long = " ".join(["Once upon a time"] * 20)   # longer than the context
    r = subprocess.run([str(run_exe), str(path), "-z", str(data_dir / "tok512.bin"), "-i", long,
                        "-k", "0", "-t", "0"], capture_output=True, text=True, errors="replace")
    assert r.returncode == 1 and "longer than the context (40)" in r.stderr
    # with the shift on, the long prompt keeps BOS and its newest tokens, as in Python
    r = subprocess.run([str(run_exe), str(path), "-z", str(data_dir / "tok512.bin"), "-i", long,
                        "-t", "0", "-n", str(3 * SEQ)], capture_output=True, text=True,
                       errors="replace")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("mode", ["generate", "chat"])
def test_cli_context_too_short_to_shift(run_exe, data_dir, tmp_path, mode):
    """A context of 2 cannot shift: the C CLI says so, as Python's check_n_keep does (it once
    said "n_keep must be in [1, 0]" in chat)."""
    args = dataclasses.replace(PRESETS["stories260K"], max_seq_len=2)
    path = write_model(scaled_model(args, 2.0, seed=3), tmp_path / "m2.bin", version=0)
    r = subprocess.run([str(run_exe), str(path), "-z", str(data_dir / "tok512.bin"), "-m", mode,
                        "-i", "hi", "-y", "", "-n", "10", "-t", "0"], capture_output=True,
                       text=True, errors="replace")
    assert r.returncode == 1
    assert "a context of 2 positions is too short to shift (it needs 3" in r.stderr, r.stderr
    assert "[1, 0]" not in r.stderr


def test_cli_context_shift_sanitizers_clean(files, data_dir, tmp_path, tmp_path_factory):
    """ASan + UBSan build of the CLI generating over 3 contexts: clean, and the same ids."""
    exe = sanitizer_cli(tmp_path_factory)
    for version, n_keep, temperature in ((0, 3, 0.0), (2, 1, 0.0), (2, 2, 1.0)):
        path = files[1][version]
        prompt, ids, err = _cli_ids(exe, path, data_dir / "tok512.bin", tmp_path / "ids", "-n",
                                    str(3 * SEQ), "-t", str(temperature), "-s", "5", "-k",
                                    str(n_keep), env=SANITIZER_ENV)
        assert_sanitizer_clean(err)
        ref = list(NumpyLlama.load(path).generate(prompt, 3 * SEQ, temperature, 0.9, 5,
                                                  n_keep=n_keep))
        assert ids == ref
        if temperature == 0.0:   # greedy here never meets EOS: three contexts' worth
            assert len(ids) == 3 * SEQ - len(prompt) + 1


@pytest.mark.parametrize("chunk_seconds", [0.0, 1e9])   # one token a call; doubling chunks
def test_c_generate_chunks_do_not_change_the_tokens(files, chunk_seconds):
    """CLlama.generate runs the loop in C a chunk of tokens per call (sized by time): any
    chunking draws NumPy's tokens, and a generator dropped midway leaves the engine usable."""
    path, prompt = files[1][2], [1, 300, 270, 11]
    ref = list(NumpyLlama.load(path).generate(prompt, 3 * SEQ, 1.0, 0.9, 3, n_keep=2))
    assert len(ref) > SEQ, "the run must cross a shift"
    e = CLlama.load(path, threads=1)
    e.CHUNK_SECONDS = chunk_seconds
    g = e.generate(prompt, 3 * SEQ, 1.0, 0.9, 3, n_keep=2)
    assert [next(g) for _ in range(5)] == ref[:5]
    g.close()
    assert list(e.generate(prompt, 3 * SEQ, 1.0, 0.9, 3, n_keep=2)) == ref
    with pytest.raises(ValueError, match="n_keep"):   # checked when the run passes the end
        list(e.generate(prompt, SEQ + 1, n_keep=SEQ - 1))
    with pytest.raises(ValueError, match="token id 512 outside the vocabulary"):
        list(e.generate([1, 512], 5))


@pytest.mark.parametrize("engine", ["numpy", "c"])
def test_python_cli_generates_past_the_context(files, data_dir, engine, capsys):
    """`babyllama generate -n 3*SEQ -k N` prints what the engines' generate gives with that
    shift, and `-k 0` stops at the end of the context, as run.c does."""
    from babyllama.cli import main
    from babyllama.tokenizer import Tokenizer

    path, tok_bin = files[1][0], data_dir / "tok512.bin"
    tok = Tokenizer.from_bin(tok_bin)
    prompt = tok.encode("Once upon a time", bos=True)
    for keep in (2, 0):
        ref = list(NumpyLlama.load(path).generate(prompt, 3 * SEQ, 0.0, 0.9, 1,
                                                  context_shift=keep > 0, n_keep=max(keep, 1)))
        assert len(ref) == (3 * SEQ if keep else SEQ) - len(prompt) + 1   # no early EOS
        assert main(["generate", str(path), "-z", str(tok_bin), "-i", "Once upon a time",
                     "-t", "0", "-s", "1", "-n", str(3 * SEQ), "-k", str(keep),
                     "--engine", engine]) in (0, None)
        out = capsys.readouterr().out
        assert out == "Once upon a time" + "".join(tok.stream(iter(ref), prev=prompt[-1])) + "\n"


def test_python_cli_torch_threads_last_one_command(files, data_dir, monkeypatch, capsys):
    """`--engine torch --threads N` runs the command on N torch threads and leaves torch's
    process-wide count as it found it, after an error too (main() runs in tests and notebooks
    as well as in its own process)."""
    from babyllama import chat
    from babyllama.cli import main

    seen, generate = [], chat.TorchEngine.generate

    def spy(self, *a, **kw):
        seen.append(torch.get_num_threads())
        yield from generate(self, *a, **kw)

    monkeypatch.setattr(chat.TorchEngine, "generate", spy)
    before = torch.get_num_threads()   # 1: this module's fixture
    cmd = ["generate", str(files[1][0]), "-z", str(data_dir / "tok512.bin"), "-t", "0",
           "--engine", "torch", "--threads", str(before + 1)]
    assert main([*cmd, "-i", "Once upon a time", "-n", "8"]) in (0, None)
    assert seen == [before + 1] and torch.get_num_threads() == before
    long = " ".join(["Once upon a time"] * 20)   # longer than the context, and no shift
    assert main([*cmd, "-i", long, "-k", "0"]) == 1
    assert "longer than the context" in capsys.readouterr().err
    assert seen == [before + 1] * 2 and torch.get_num_threads() == before
