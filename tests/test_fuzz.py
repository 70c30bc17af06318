"""Fuzzing (issue 16): thousands of seeded bad files through both engines, both tokenizer
readers, the C CLI and its AddressSanitizer/UBSan build.

Every file must give either a working model (tokenizer) or an error of the project's own type
naming the file; never a signal, a hang or another exception; and C and NumPy (Python) must
accept and refuse exactly the same files. The C library runs in worker processes (tests/
fuzzing.py), two at a time, so that a segfault fails the test and names the file."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fuzzing import (
    TINY,
    many_layers_v0,
    mutate_model,
    mutate_tokenizer,
    overflow_file,
    record_offsets,
    tokenizer_bin,
    write_tiny,
)

from babyllama import fast_c
from babyllama.config import ModelArgs

CSRC = Path(fast_c.__file__).resolve().parents[2] / "csrc"
WORKER = Path(__file__).resolve().parent / "fuzzing.py"
N_MODELS, N_TOKENIZERS = 2100, 1100
BASES = [(0, True), (0, False), (1, True), (1, False), (2, True), (2, False)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """The seeded bad files: mutated models, crafted headers, mutated tokenizers."""
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(20261201)
    bases = {}
    for version, shared in BASES:
        p = write_tiny(d / f"base_v{version}_{shared}.bin", version, shared,
                       group_size=4 if shared else 8)
        bases[version, shared] = p.read_bytes()
    models = [overflow_file(d / "overflow_v0.bin", 0), overflow_file(d / "overflow_v1.bin", 1),
              overflow_file(d / "overflow_v2.bin", 2), many_layers_v0(d / "layers.bin"),
              *(d / f"base_v{v}_{s}.bin" for v, s in BASES)]
    models += [overflow_file(d / f"overflow_v0_{n}.bin", 0, seq_len=n) for n in range(2, 12)]
    for i in range(N_MODELS):
        version, shared = BASES[i % len(BASES)]
        p = d / f"m{i:05d}_v{version}.bin"
        p.write_bytes(mutate_model(bases[version, shared], version, rng))
        models.append(p)
    nan = np.ones(TINY.dim, dtype=np.float32)
    nan[0] = np.nan
    models.append(write_tiny(d / "nan_norm_v2.bin", 2, **{"layers.0.attention_norm": nan}))
    toks = []
    for k, fallback in enumerate((True, False)):   # 309 pieces with byte fallback; 12 without
        raw = tokenizer_bin(d / f"tok{k}.bin", byte_fallback=fallback).read_bytes()
        offs = record_offsets(raw)
        toks.append((d / f"tok{k}.bin", len(offs) - 1))
        for i in range(N_TOKENIZERS // 2):
            p = d / f"t{k}_{i:05d}.bin"
            p.write_bytes(mutate_tokenizer(raw, rng, offs))
            toks.append((p, len(offs) - 1))
    return {"dir": d, "models": models, "tokenizers": toks, "tok12": d / "tok1.bin"}


def run_workers(kind: str, lines: list[str], tmp: Path, timeout: float = 100) -> list[dict]:
    """Both halves of `lines` in two worker processes at once; their JSON records."""
    procs = []
    for k, part in enumerate((lines[0::2], lines[1::2])):
        listing = tmp / f"{kind}{k}.txt"
        listing.write_text("\n".join(part))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), kind, str(listing)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    records = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"hang: a worker ran over {timeout} s, at {last_start(out)}")
        assert proc.returncode == 0, (f"worker died (return code {proc.returncode}) at "
                                      f"{last_start(out)}:\n{err[-3000:]}")
        records += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return records


def last_start(out: str) -> str:
    starts = [line for line in out.splitlines() if line.startswith("start ")]
    return starts[-1][6:] if starts else "the first file"


# ----------------------------------------------------------------------------------------------
# the library level: every file

def test_fuzz_models_c_and_numpy_agree(corpus, tmp_path):
    recs = run_workers("models", [str(p) for p in corpus["models"]], tmp_path)
    assert len(recs) == len(corpus["models"]) >= 2000
    accepted = 0
    for r in recs:
        for name, err in (("np", "ModelFileError"), ("c", "CError")):
            what, named = r[name][:2]
            assert what in ("ok", err), f"{r['path']}: {name}: {what}"
            assert named, f"{r['path']}: the {name} error does not name the file"
            if what == "ok":   # forward and sampling: a token, or the non-finite error
                assert r[name][2] in ("ok", "NonFiniteError"), f"{r['path']}: {r[name][2]}"
        assert r["np"][0] == "ok" or r["c"][0] != "ok", f"{r['path']}: C accepted, NumPy not"
        assert r["c"][0] == "ok" or r["np"][0] != "ok", f"{r['path']}: NumPy accepted, C not"
        accepted += r["np"][0] == "ok"
    by_path = {Path(r["path"]).name: r for r in recs}
    for crafted in ("overflow_v0.bin", "overflow_v1.bin", "overflow_v2.bin", "layers.bin"):
        assert by_path[crafted]["np"][0] == "ModelFileError"
    assert by_path["nan_norm_v2.bin"]["np"][2] == by_path["nan_norm_v2.bin"]["c"][2] == \
        "NonFiniteError"
    assert 0.05 < accepted / len(recs) < 0.95   # the mutations reach both outcomes


def test_fuzz_tokenizers_python_and_c_agree(corpus, tmp_path):
    lines = [f"{p} {v}" for p, v in corpus["tokenizers"]]
    recs = run_workers("tokenizers", lines, tmp_path)
    assert len(recs) == len(lines) >= 1000
    both = 0
    for r in recs:
        for v, res in r["vocab"].items():
            for key, err in (("py", "TokenizerError"), ("c", "CError")):
                what, named = res[key]
                assert what in ("ok", err), f"{r['path']} (vocab {v}): {key}: {what}"
                assert named, f"{r['path']}: the {key} error does not name the file"
            assert (res["py"][0] == "ok") == (res["c"][0] == "ok"), \
                f"{r['path']} (vocab {v}): {res}"
            if res["py"][0] == "ok":
                assert res["same"], f"{r['path']} (vocab {v}): C and Python encode differently"
                both += 1
    assert 0.05 < both / (2 * len(recs)) < 0.95


# ----------------------------------------------------------------------------------------------
# the command line: a sample of the files, one process each

@pytest.fixture(scope="module")
def cli() -> Path:
    subprocess.run(["make", "-s", "-C", str(CSRC), "run"], check=True, capture_output=True)
    return CSRC / "run"


def run_cli(exe: Path, model: Path, tok: Path, *flags: str,
            env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), str(model), "-z", str(tok), "-n", "12", "-s", "3", "-i",
                           "ab a", *flags], capture_output=True, text=True, errors="replace",
                          timeout=30, env=env)


def check_cli(r: subprocess.CompletedProcess, model: Path, tok: Path) -> None:
    assert r.returncode in (0, 1), f"{model}: return code {r.returncode}: {r.stderr[-2000:]}"
    if r.returncode == 1:   # a file's error names it; or the position, or the prompt's length
        msg = r.stderr.splitlines()[-1] if r.stderr else ""
        assert msg.startswith("error: ") and any(
            s in msg for s in (str(model), str(tok), "position", "longer than the context")), \
            f"{model}: {r.stderr}"


def test_fuzz_cli(corpus, cli):
    rng = np.random.default_rng(5)
    models = corpus["models"]
    sample = models[:10] + [models[i] for i in rng.choice(len(models), 150, replace=False)]
    for m in sample:
        check_cli(run_cli(cli, m, corpus["tok12"]), m, corpus["tok12"])
    small = [p for p, v in corpus["tokenizers"] if v == 12]
    for t in [small[i] for i in rng.choice(len(small), 60, replace=False)]:
        check_cli(run_cli(cli, corpus["dir"] / "base_v0_True.bin", t),
                  corpus["dir"] / "base_v0_True.bin", t)


# ----------------------------------------------------------------------------------------------
# AddressSanitizer + UndefinedBehaviorSanitizer: a subset of the files, and the sampler's edges

def test_fuzz_under_sanitizers(corpus, tmp_path, asan_cli):
    exe = asan_cli   # built once a session (conftest.py)
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"}
    d, tok12 = corpus["dir"], corpus["tok12"]

    def run(model, tok=tok12, *flags):
        r = run_cli(exe, model, tok, *flags, env=env)
        assert "Sanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr
        check_cli(r, model, tok)
        return r

    # the sampler's edges on a valid model: a valid token every time
    base = d / "base_v0_True.bin"
    for flags in (("-t", "1e-40"), ("-t", "inf", "-p", "0.0001"), ("-t", "1e-30", "-p", "1e-30"),
                  ("-t", "0"), ("-t", "1", "-p", "1")):
        assert run(base, tok12, *flags).returncode == 0, flags
    greedy = run(base, tok12, "-t", "0").stdout
    assert run(base, tok12, "-t", "1e-40").stdout == greedy
    # NaN weights (fp32 and int8): a clear error, not <unk>s and exit 0
    nan = np.ones(TINY.dim, dtype=np.float32)
    nan[2] = np.nan
    for v in (0, 2):
        m = write_tiny(tmp_path / f"nan{v}.bin", v, **{"layers.1.w2": np.full((8, 16), np.nan,
                                                                             np.float32)}
                       if v == 0 else {"norm": nan})
        r = run(m)
        assert r.returncode == 1 and "not finite" in r.stderr
    # v2 scales off 4-byte alignment (dim 6, 13 tokens): no misaligned load
    mis = ModelArgs(dim=6, hidden_dim=9, n_layers=1, n_heads=3, n_kv_heads=1, vocab_size=13,
                    max_seq_len=8)
    tok13 = tmp_path / "tok13.bin"
    tok13.write_bytes(tok12.read_bytes() + struct.pack("<fi", -50.0, 2) + b"bb")
    assert run(write_tiny(tmp_path / "mis.bin", 2, False, a=mis, group_size=3),
               tok13).returncode == 0
    # the crafted headers and the valid bases
    for m in corpus["models"][:9]:
        run(m)
    # a sample of the mutated models and tokenizers
    rng = np.random.default_rng(11)
    for i in rng.choice(len(corpus["models"]), 40, replace=False):
        run(corpus["models"][i])
    small = [p for p, v in corpus["tokenizers"] if v == 12]
    for i in rng.choice(len(small), 15, replace=False):
        run(base, small[i])
