"""Chat mode: the ids fed for a conversation are run.c's rendering of it (checked against
sentencepiece with Llama 2's tokenizer), the KV cache lives across the turns, and the C CLI
(`run -m chat`) and `babyllama chat` (every engine) feed the same ids, context shifts included.

The model is random but made chatty: a constant embedding feature gives EOS a fixed logit, so
replies end after a few tokens (about 1 in 8 draws is EOS) and a conversation crosses turns."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SANITIZER_ENV, assert_sanitizer_clean, build_cli, sanitizer_cli, torch_threads

from babyllama.chat import ChatSession, TorchEngine
from babyllama.export import write_model
from babyllama.fast_c import CLlama
from babyllama.inference_numpy import NumpyLlama
from babyllama.model import ModelArgs, Transformer
from babyllama.tokenizer import Tokenizer

SEQ = 64
SYSTEM = "You are a kind storyteller."
TURNS = ["Hi there", "Tell me a story about a fox.", "Thanks!", "One more, please", "Bye"]


def chatty_model(seq_len: int = SEQ, eos_logit: float = 8.5) -> Transformer:
    """Random weights, vocabulary 32000, and EOS's logit ~eos_logit at every position: the
    residual stream's feature 0 is a constant 10 (so the final rmsnorm maps it to ~sqrt(dim))
    and only EOS's classifier row reads it."""
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000,
                     max_seq_len=seq_len, multiple_of=16)
    m = Transformer(args).eval()
    with torch.no_grad():
        m.output.weight = torch.nn.Parameter(m.tok_embeddings.weight.clone() * 20)   # unshared
        m.tok_embeddings.weight[:, 0] = 10.0
        m.output.weight[:, 0] = 0.0
        m.output.weight[2] = 0.0
        m.output.weight[2, 0] = eos_logit / math.sqrt(args.dim)
    return m


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def chatty(tmp_path_factory, llama2_bin):
    d = tmp_path_factory.mktemp("chat")
    m = chatty_model()
    return {"bin": write_model(m, d / "chatty.bin", version=0), "hf": m.save_pretrained(d / "hf"),
            "tok": llama2_bin, "dir": d,
            "long": write_model(chatty_model(seq_len=512), d / "long.bin", version=0)}


def _render(user: str, system: str | None) -> str:   # written out from run.c, not imported
    if system:
        return f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"
    return f"[INST] {user} [/INST]"


def test_fed_ids_are_run_c_rendering(chatty, llama2_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(llama2_model))
    engine = NumpyLlama.load(chatty["long"])   # a 512-token context: no shift here
    calls = []
    prefill = engine.prefill
    engine.prefill = lambda toks, pos: calls.append((list(toks), pos)) or prefill(toks, pos)
    session = ChatSession(engine, Tokenizer.from_bin(chatty["tok"]), SYSTEM, seed=42)
    replies = [session.turn(u) for u in TURNS[:3]]
    assert all(replies) and all(2 not in r for r in replies)
    expect = []
    for i, (user, reply) in enumerate(zip(TURNS[:3], replies)):
        if i:
            expect.append(2)   # the previous reply's EOS, then BOS: as run.c feeds them
        expect += [1, *sp.encode(_render(user, SYSTEM if i == 0 else None)), *reply]
    assert [t for ids in session.fed for t in ids] == expect
    # a turn is fed in one call, at the positions after what the cache already holds
    assert session.ctx.n_shifts == 0
    assert [pos for _, pos in calls] == list(np.cumsum([0, *map(len, session.fed[:-1])]))
    assert session.ctx.tokens == expect


def _python_chat(mp, capsys, engine: str, model: Path, tok: Path, dump: Path, stdin: str,
                 *flags: str):
    """`babyllama chat` in process (stdin, stdout and the dump variable patched)."""
    from babyllama.cli import main

    mp.setenv("BABYLLAMA_DUMP_IDS", str(dump))
    mp.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    rc = main(["chat", str(model), "-z", str(tok), "--engine", engine, *flags])
    out = capsys.readouterr()
    return subprocess.CompletedProcess([], rc, out.out, out.err)


@pytest.fixture(scope="module")
def run_exe():
    return build_cli()


def _c_chat(run_exe, model, tok, dump, stdin, *flags, env=None):
    env = {**os.environ, **(env or {}), "BABYLLAMA_DUMP_IDS": str(dump)}
    return subprocess.run([str(run_exe), str(model), "-z", str(tok), "-m", "chat", *flags],
                          input=stdin, capture_output=True, text=True, errors="replace", env=env,
                          timeout=120)


def test_cli_and_every_python_engine_feed_the_same_ids(chatty, run_exe, monkeypatch, capsys):
    """Five turns over stdin on a 64-token context: several shifts, no hang, same ids."""
    stdin = "".join(t + "\n" for t in TURNS[1:])
    flags = ["-y", SYSTEM, "-i", TURNS[0], "-s", "42", "-t", "1.0", "-p", "0.9"]
    c = _c_chat(run_exe, chatty["bin"], chatty["tok"], chatty["dir"] / "c.ids", stdin, *flags)
    assert c.returncode == 0, c.stderr
    assert c.stdout.count("Assistant: ") == 5 and c.stdout.count("User: ") == 5   # 4 + EOF
    c_ids = [list(map(int, line.split()))
             for line in (chatty["dir"] / "c.ids").read_text().splitlines()]
    flat = [t for ids in c_ids for t in ids]
    assert len(flat) > 2 * SEQ and flat.count(1) == 5 and flat.count(2) == 4
    # the same conversation through the Python session, in process, shows the shifts
    session = ChatSession(NumpyLlama.load(chatty["bin"]), Tokenizer.from_bin(chatty["tok"]),
                          SYSTEM, 1.0, 0.9, seed=42)
    for user in TURNS:
        session.turn(user)
    assert session.fed == c_ids and session.ctx.n_shifts >= 2
    # the command line over stdin once; the other engines in process (the same session)
    py = _python_chat(monkeypatch, capsys, "numpy", chatty["bin"], chatty["tok"],
                      chatty["dir"] / "np.ids", stdin, *flags)
    assert py.returncode == 0, py.stderr
    assert (chatty["dir"] / "np.ids").read_text() == (chatty["dir"] / "c.ids").read_text()
    assert py.stdout.count("Assistant: ") == 5
    for engine in (CLlama.load(chatty["bin"], threads=1),
                   TorchEngine(Transformer.from_pretrained(chatty["hf"]).eval())):
        other = ChatSession(engine, Tokenizer.from_bin(chatty["tok"]), SYSTEM, 1.0, 0.9,
                            seed=42)
        for user in TURNS:
            other.turn(user)
        assert other.fed == c_ids, type(engine).__name__


def test_system_prompt_and_first_turn_from_stdin(chatty, run_exe, monkeypatch, capsys):
    stdin = f"{SYSTEM}\n{TURNS[0]}\n"
    c = _c_chat(run_exe, chatty["bin"], chatty["tok"], chatty["dir"] / "c2.ids", stdin,
                "-s", "7")
    py = _python_chat(monkeypatch, capsys, "numpy", chatty["bin"], chatty["tok"],
                      chatty["dir"] / "p2.ids", stdin, "-s", "7")
    assert c.returncode == 0 and py.returncode == 0, c.stderr + py.stderr
    assert c.stdout.startswith("Enter system prompt (optional): User: Assistant: ")
    tok = Tokenizer.from_bin(chatty["tok"])
    first = (chatty["dir"] / "c2.ids").read_text().splitlines()[0]
    assert first == " ".join(map(str, tok.encode(_render(TURNS[0], SYSTEM))))
    assert (chatty["dir"] / "c2.ids").read_text() == (chatty["dir"] / "p2.ids").read_text()
    # empty input: the CLI stops at the end of stdin, it does not loop
    for proc in (_c_chat(run_exe, chatty["bin"], chatty["tok"], chatty["dir"] / "e.ids", ""),
                 _python_chat(monkeypatch, capsys, "c", chatty["bin"], chatty["tok"],
                              chatty["dir"] / "e.ids", "")):
        assert proc.returncode == 0 and "Assistant" not in proc.stdout


def test_a_turn_that_does_not_fit_without_the_shift(chatty, run_exe, monkeypatch, capsys):
    long_turn = "Tell me a long story about " + "a red fox and " * 20 + "a kite."
    for proc in (_c_chat(run_exe, chatty["bin"], chatty["tok"], chatty["dir"] / "x.ids", "",
                         "-y", SYSTEM, "-i", long_turn, "-k", "0"),
                 _python_chat(monkeypatch, capsys, "numpy", chatty["bin"], chatty["tok"],
                              chatty["dir"] / "x.ids", "", "-y", SYSTEM, "-i", long_turn,
                              "-k", "0")):
        assert proc.returncode == 1
        assert "do not fit in the context" in proc.stderr and "shift is off" in proc.stderr
    # in Python the session stays usable after the rejected turn
    session = ChatSession(CLlama.load(chatty["bin"], threads=1),
                          Tokenizer.from_bin(chatty["tok"]), SYSTEM, seed=3,
                          context_shift=False)
    with pytest.raises(ValueError, match="do not fit"):
        session.turn(long_turn)
    assert session.fed == [] and len(session.ctx) == 0
    session.turn("Hi")
    assert session.fed[0][:2] == [1, 518] and len(session.ctx) == len(session.fed[0]) + \
        sum(len(f) for f in session.fed[1:])


def test_unknown_mode_is_usage_and_exit_2(chatty, run_exe):
    bad = subprocess.run([str(run_exe), str(chatty["bin"]), "-z", str(chatty["tok"]), "-m",
                          "talk"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown mode: talk" in bad.stderr and "Usage" in bad.stderr
    bad = subprocess.run([str(run_exe), str(chatty["bin"]), "-k", "-1", "-m", "chat"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "-k" in bad.stderr


def test_torch_engine_adapter_matches_numpy(chatty):
    torch_engine = TorchEngine(Transformer.from_pretrained(chatty["hf"]).eval())
    np_engine = NumpyLlama.load(chatty["bin"])
    toks = [1, 518, 25580, 29962, 6324]
    a = torch_engine.forward_tokens(toks, 0)
    b = np_engine.forward_tokens(toks, 0)
    assert np.abs(a - b).max() <= 1e-4


def test_chat_is_sanitizer_clean(chatty, tmp_path, tmp_path_factory):
    """ASan + UBSan build of the CLI: a conversation across shifts, and a turn rejected with
    the shift off."""
    exe = sanitizer_cli(tmp_path_factory)
    stdin = "".join(t + "\n" for t in TURNS)
    for flags, rc in (([], 0), (["-k", "0"], 1), (["-k", "3", "-n", "100"], 0)):   # seed 6:
        # without the shift a later turn finds 56 of 64 positions used: an error
        r = _c_chat(exe, chatty["bin"], chatty["tok"], tmp_path / "ids", stdin, "-s", "6",
                    "-y", SYSTEM, "-i", "Hello", *flags, env=SANITIZER_ENV)
        assert_sanitizer_clean(r.stderr)
        assert r.returncode == rc, r.stderr
