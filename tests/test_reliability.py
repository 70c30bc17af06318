"""Issue 16's defects, one test each: crafted headers, degenerate sampling, non-regular files,
non-finite scales, tokenizer files cut at a record boundary, tokenizer export failures.

Anything that could crash the interpreter (the C library on a bad file) runs in a subprocess,
and anything that could block (a FIFO) runs under a timeout."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fuzzing import TINY, many_layers_v0, overflow_file, record_offsets, write_tiny

from babyllama import fast_c
from babyllama.config import ModelArgs
from babyllama.export import ModelFileError, read_header, read_model
from babyllama.fast_c import CError, CLlama, CTokenizer
from babyllama.inference_numpy import NonFiniteError, NumpyLlama, XorShiftRng, sample
from babyllama.tokenizer import Tokenizer, TokenizerError, export_tokenizer_bin

CSRC = Path(fast_c.__file__).resolve().parents[2] / "csrc"


@contextmanager
def deadline(seconds: int):
    """Fail (rather than hang) when the body takes longer than `seconds`."""
    def on_alarm(*_):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_python(code: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cli() -> Path:
    subprocess.run(["make", "-s", "-C", str(CSRC), "run"], check=True, capture_output=True)
    return CSRC / "run"


@pytest.fixture(scope="module")
def tok512(data_dir) -> Path:
    return data_dir / "tok512.bin"


MISALIGNED = ModelArgs(dim=6, hidden_dim=9, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=13,
                       max_seq_len=8)
A512 = ModelArgs(dim=8, hidden_dim=16, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=512,
                 max_seq_len=32)


# ----------------------------------------------------------------------------------------------
# 1. a header whose payload size overflows size_t; 3. a 2^20-layer file rejected at once

@pytest.mark.parametrize("version", [0, 1, 2])
def test_overflowing_header_is_rejected(tmp_path, cli, tok512, version):
    path = overflow_file(tmp_path / f"overflow_v{version}.bin", version)
    head = struct.unpack_from("<7i", path.read_bytes(), 0 if version == 0 else 8)
    assert all(0 < v <= 1 << 20 for v in head)   # every field passes the plausibility check
    r = run_python(f"""
        from babyllama.fast_c import CLlama, CError
        try:
            CLlama.load({str(path)!r}, threads=1).forward(1, 0)
            print("ACCEPTED")
        except CError as e:
            print("REJECTED", e)
    """)
    assert r.returncode == 0, f"the C loader crashed (signal {-r.returncode}): {r.stderr}"
    assert r.stdout.startswith("REJECTED") and str(path) in r.stdout, r.stdout
    assert "the header describes a file of more than" in r.stdout   # by arithmetic
    with deadline(10), pytest.raises(ModelFileError, match=str(path)):
        NumpyLlama.load(path)
    out = subprocess.run([str(cli), str(path), "-z", str(tok512), "-n", "4"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and f"error: {path}" in out.stderr, out


def test_many_layers_rejected_by_arithmetic(tmp_path):
    path = many_layers_v0(tmp_path / "layers.bin")
    with deadline(5), pytest.raises(ModelFileError, match="describes a"):
        read_model(path)
    with pytest.raises(CError, match="describes a"):
        CLlama.load(path, threads=1)


# ----------------------------------------------------------------------------------------------
# 2. samplers: every allowed temperature and top-p gives a valid token, the same in C and NumPy

@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-8, 0.5, 1.0, 1e30, float("inf")])
@pytest.mark.parametrize("topp", [1e-30, 1e-4, 0.5, 0.9, 1.0])
def test_degenerate_sampling_gives_valid_tokens(tmp_path, temperature, topp):
    path = write_tiny(tmp_path / "m.bin", 0, a=A512)
    c = CLlama.load(path, threads=1)
    rng = np.random.default_rng(0)
    for k in range(20):
        logits = (rng.standard_normal(512) * (10.0 ** (k % 5))).astype(np.float32)
        if k % 7 == 0:
            logits[:] = 3.0   # all equal
        a, b = XorShiftRng(k + 1), XorShiftRng(k + 1)
        t_np = sample(logits, temperature, topp, a)
        t_c = c.sample(logits, temperature, topp, b)
        assert 0 <= t_np < 512 and t_np == t_c and a.state == b.state
        if temperature < 1e-30:   # 1/temperature overflows: the limit is argmax
            assert t_np == int(np.argmax(logits))


def test_no_token_above_the_cutoff_is_the_top_token(tmp_path):
    path = write_tiny(tmp_path / "m.bin", 0, a=A512)
    logits = np.zeros(512, dtype=np.float32)
    logits[77] = 1e-3   # nearly uniform: every p ~ 1/512 < (1 - 1e-4) / 511
    assert sample(logits, float("inf"), 1e-4, XorShiftRng(1)) == 0   # inf: exactly uniform
    assert sample(logits, 1.0, 1e-4, XorShiftRng(1)) == 77
    assert CLlama.load(path, threads=1).sample(logits, 1.0, 1e-4, XorShiftRng(1)) == 77


def test_vocab_size_one(tmp_path):
    a = ModelArgs(dim=8, hidden_dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=1,
                  max_seq_len=8)
    path = write_tiny(tmp_path / "v1.bin", 0, a=a)
    for engine in (NumpyLlama.load(path), CLlama.load(path, threads=1)):
        for t, p in ((1.0, 0.9), (1.0, 1.0), (0.0, 0.9), (float("inf"), 1e-4)):
            assert list(engine.generate([0], 8, t, p, seed=3)) == [0] * 8


def _nan_model(tmp_path, version: int) -> Path:
    norm = np.ones(TINY.dim, dtype=np.float32)
    norm[3] = np.nan
    return write_tiny(tmp_path / f"nan_v{version}.bin", version, a=A512,
                      **{"layers.1.ffn_norm": norm})


@pytest.mark.parametrize("version", [0, 2])
def test_non_finite_logits_are_an_error_naming_the_position(tmp_path, version):
    path = _nan_model(tmp_path, version)
    np_engine, c_engine = NumpyLlama.load(path), CLlama.load(path, threads=1)
    # v2: a NaN activation used to be quantized to finite int8 values in C
    assert not np.isfinite(np_engine.forward(5, 0)).any()
    assert not np.isfinite(c_engine.forward(5, 0)).any()
    for gen in (np_engine.generate, c_engine.generate, c_engine.generate_native):
        with pytest.raises(NonFiniteError, match=r"position 2: .*logit of token \d+ is nan"):
            list(gen([1, 5, 6], 10, 1.0, 0.9, 7))


def test_cli_sampler_edge_cases(tmp_path, cli, tok512):
    path = write_tiny(tmp_path / "m.bin", 0, a=A512)

    def run(model, *flags):
        return subprocess.run([str(cli), str(model), "-z", str(tok512), "-n", "20", "-s", "5",
                               "-i", "Once", *flags], capture_output=True, text=True,
                              errors="replace", timeout=30)

    greedy = run(path, "-t", "0")
    tiny_t = run(path, "-t", "1e-40")
    assert tiny_t.returncode == 0 and tiny_t.stdout == greedy.stdout
    assert run(path, "-t", "inf", "-p", "0.0001").returncode == 0
    bad = run(_nan_model(tmp_path, 0))
    assert bad.returncode == 1 and "error:" in bad.stderr and "not finite" in bad.stderr, bad
    py = subprocess.run([sys.executable, "-m", "babyllama", "generate",
                         str(_nan_model(tmp_path, 0)), "-z", str(tok512), "-n", "10", "--engine",
                         "c"], capture_output=True, text=True, timeout=60)
    assert py.returncode != 0 and "not finite" in py.stderr and "Traceback" not in py.stderr


# ----------------------------------------------------------------------------------------------
# 4. FIFOs, devices and directories: an error, never a hang or an endless read

def test_non_regular_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    paths = [str(fifo), "/dev/zero", str(tmp_path)]
    r = run_python(f"""
        from babyllama.fast_c import CLlama, CTokenizer, CError
        from babyllama.export import read_model, ModelFileError
        from babyllama.inference_numpy import NumpyLlama
        from babyllama.tokenizer import Tokenizer, read_tokenizer_bin, TokenizerError
        for p in {paths!r}:
            for name, fn, err in (("c-model", lambda: CLlama.load(p, threads=1), CError),
                                  ("np-model", lambda: NumpyLlama.load(p), ModelFileError),
                                  ("read_model", lambda: read_model(p), ModelFileError),
                                  ("c-tok", lambda: CTokenizer(p), CError),
                                  ("py-tok", lambda: Tokenizer.from_bin(p), TokenizerError),
                                  ("read_tok", lambda: read_tokenizer_bin(p), TokenizerError)):
                try:
                    fn()
                    print(name, p, "ACCEPTED")
                except err as e:
                    ok = p in str(e) and "not a regular file" in str(e)
                    print(name, p, "OK" if ok else "BAD MESSAGE: " + str(e))
    """, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 18 and all(line.endswith("OK") for line in lines), r.stdout


# ----------------------------------------------------------------------------------------------
# 5. v2 scales must be finite

@pytest.mark.parametrize("tensor", ["tok_embeddings", "layers.1.wq", "output"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_v2_non_finite_scale_rejected_by_both(tmp_path, tensor, bad):
    shared = tensor != "output"
    path = write_tiny(tmp_path / "q.bin", 2, shared=shared, a=A512)
    raw = bytearray(path.read_bytes())
    # the scale's offset, from the layout (not from read_model): norms, then each matrix
    a, gs, L = A512, 4, A512.n_layers
    kv = a.n_kv_heads * a.head_dim
    off = 256 + 4 * a.dim * (2 * L + 1)

    def mat(n):
        return n + 4 * n // gs

    sizes = {"tok_embeddings": a.vocab_size * a.dim}
    off_of = {"tok_embeddings": off}
    off += mat(sizes["tok_embeddings"])
    for name, n in (("wq", a.dim * a.dim), ("wk", kv * a.dim), ("wv", kv * a.dim),
                    ("wo", a.dim * a.dim), ("w1", a.hidden_dim * a.dim),
                    ("w2", a.dim * a.hidden_dim), ("w3", a.hidden_dim * a.dim)):
        for l in range(L):
            off_of[f"layers.{l}.{name}"], sizes[f"layers.{l}.{name}"] = off, n
            off += mat(n)
    off_of["output"], sizes["output"] = off, a.vocab_size * a.dim
    assert off + (0 if shared else mat(sizes["output"])) == len(raw)
    at = off_of[tensor] + sizes[tensor] + 4 * 2   # its third group's scale
    raw[at:at + 4] = struct.pack("<f", bad)
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match=rf"{path}: offset {at}: {tensor} .*not finite"):
        NumpyLlama.load(path)
    with pytest.raises(CError, match=rf"{path}: offset {at}: {tensor} .*not finite"):
        CLlama.load(path, threads=1)


def test_v2_misaligned_scales(tmp_path):
    """dim 6 and 13 tokens: the embedding's 78 int8 values leave its scales (and everything
    after) off 4-byte alignment. C copies them aligned (UBSan: no misaligned load, see
    test_fuzz) and computes what NumPy does."""
    path = write_tiny(tmp_path / "mis.bin", 2, shared=False, a=MISALIGNED, group_size=3)
    np_engine, c_engine = NumpyLlama.load(path), CLlama.load(path, threads=1)
    for pos, t in enumerate([1, 5, 12, 7]):
        assert np.abs(np_engine.forward(t, pos) - c_engine.forward(t, pos)).max() < 1e-5


# ----------------------------------------------------------------------------------------------
# 6. tokenizer readers: the same validation, the same files accepted

def test_tokenizer_cut_at_a_record_boundary(tmp_path, tok512):
    """Cut after n records: refused when the size asked for is missing, or when the longest
    piece went with the cut (max_token_length no longer holds); else the readers agree."""
    raw = tok512.read_bytes()
    offs = record_offsets(raw)
    lengths = [struct.unpack_from("<i", raw, o + 4)[0] for o in offs[:-1]]
    max_len = struct.unpack_from("<i", raw, 0)[0]
    rejected = 0
    for n in (3, 100, 300, 400, 511):
        p = tmp_path / f"cut{n}.bin"
        p.write_bytes(raw[:offs[n]])
        for vocab in (None, 512):
            if vocab or max(lengths[:n]) < max_len:
                rejected += 1
                with pytest.raises(TokenizerError, match=str(p)):
                    Tokenizer.from_bin(p, vocab)
                with pytest.raises(CError, match=str(p)):
                    CTokenizer(p, vocab or 0)
            else:
                text = "Once upon a time"
                assert CTokenizer(p).encode(text) == Tokenizer.from_bin(p).encode(text)
    assert rejected > 5


def test_tokenizer_readers_agree_on_odd_but_valid_files(tmp_path, tok512):
    """Files both readers accept encode to the same ids (pieces that are not UTF-8, NULs)."""
    raw = bytearray(tok512.read_bytes())
    offs = record_offsets(bytes(raw))
    for k, patch in enumerate((b"\xff", b"a\0", b"\xe2\x96")):
        b = bytearray(raw)
        start = offs[300] + 8   # piece 300 becomes invalid UTF-8 or holds a NUL
        n = struct.unpack_from("<i", b, offs[300] + 4)[0]
        b[start:start + min(n, len(patch))] = patch[:n]
        p = tmp_path / f"odd{k}.bin"
        p.write_bytes(bytes(b))
        text = "Once upon a time, there was a little cat named Tim. 🐈"
        assert CTokenizer(p, 512).encode(text) == Tokenizer.from_bin(p, 512).encode(text)


# ----------------------------------------------------------------------------------------------
# 7. tokenizer export: invalid UTF-8 named, a directory as output, no temporaries left

def test_export_invalid_utf8_piece_names_the_file(tmp_path, data_dir):
    raw = (data_dir / "tok512.model").read_bytes()
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(data_dir / "tok512.model"))
    piece = next(sp.id_to_piece(i).encode() for i in range(300, 512)
                 if len(sp.id_to_piece(i).encode()) >= 3
                 and raw.count(sp.id_to_piece(i).encode()) == 1)
    bad = raw.replace(piece, b"\xff" + piece[1:])
    model = tmp_path / "bad.model"
    model.write_bytes(bad)
    with pytest.raises(TokenizerError, match=rf"{model}: .*not valid UTF-8"):
        export_tokenizer_bin(model, tmp_path / "out.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.model"]


def test_export_to_a_directory(tmp_path, data_dir):
    out = tmp_path / "dir.bin"
    out.mkdir()
    with pytest.raises(TokenizerError, match=rf"{out}: .*directory"):
        export_tokenizer_bin(data_dir / "tok512.model", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.bin"]
    assert not any(out.iterdir())
    r = subprocess.run([sys.executable, "-m", "babyllama", "tokenizer", "export",
                        str(data_dir / "tok512.model"), str(out)], capture_output=True, text=True)
    assert r.returncode != 0 and "directory" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.bin"]


def test_export_cleans_up_when_writing_fails(tmp_path, data_dir, monkeypatch):
    import babyllama.tokenizer as T

    def boom(*_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(T.struct, "pack", boom)
    with pytest.raises(OSError):
        export_tokenizer_bin(data_dir / "tok512.model", tmp_path / "o.bin")
    assert list(tmp_path.iterdir()) == []


def test_read_header_still_reports_plain_errors(tmp_path):
    with pytest.raises(ModelFileError, match="cannot read"):
        read_header(tmp_path / "missing.bin")
