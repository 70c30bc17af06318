"""Batched prefill against token-by-token forward passes, NumPy against C, and the int8 SIMD paths
(csrc/simd.h) against each other, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import scaled_model

from babyllama import fast_c
from babyllama.export import write_model
from babyllama.fast_c import CLlama
from babyllama.inference_numpy import NumpyLlama
from babyllama.model import ModelArgs

CSRC = Path(fast_c.__file__).resolve().parents[2] / "csrc"
TOL = {0: 1e-4, 2: 1e-3}   # fp32, int8

# (args, Q8_0 group size): multi-head; grouped-query with 32-wide groups; 48-wide groups (the
# 16-byte SIMD step); 8-wide groups, an odd vocabulary and a 20-wide KV dim (every tail loop)
SHAPES = {
    "mha": (ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=320,
                      max_seq_len=160, hidden_dim=192), 64),
    "gqa": (ModelArgs(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=300,
                      max_seq_len=160, hidden_dim=160), 32),
    "gs48": (ModelArgs(dim=96, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256,
                       max_seq_len=160, hidden_dim=192), 48),
    "tails": (ModelArgs(dim=40, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=301,
                        max_seq_len=160, hidden_dim=88), 8),
    # 8 and 9 groups of 32 a row: the int8 prefill tile's eight-group blocks, and its tail
    "groups8": (ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=131,
                          max_seq_len=160, hidden_dim=288), 32),
    # groups narrower than 32, summed 8 groups a step (simd.h): stories260K's shape with its
    # 4-wide groups (43 groups in a w2 row: a tail of 3), and 16-wide groups
    "gs4": (ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=512,
                      max_seq_len=160, hidden_dim=172), 4),
    "gs16": (ModelArgs(dim=160, n_layers=1, n_heads=5, n_kv_heads=5, vocab_size=200,
                       max_seq_len=160, hidden_dim=208), 16),
    # rows longer than the fp32 tile's 512-value K blocks (kernels.c): 524 = 512 + 8 + a tail
    # of 4, 1100 = 512 + 512 + 72 + a tail of 4
    "wide": (ModelArgs(dim=524, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=150,
                       max_seq_len=160, hidden_dim=1100), 4),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefill")
    out = {}
    for name, (args, gs) in SHAPES.items():
        m = scaled_model(args, 2.0)
        for v in (0, 2):
            out[name, v] = write_model(m, d / f"{name}_v{v}.bin", version=v, group_size=gs)
    return out


def prompt(vocab: int, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def token_by_token(engine, toks: list[int], pos: int = 0) -> np.ndarray:
    return np.stack([engine.forward(t, pos + i) for i, t in enumerate(toks)])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("version", [0, 2])
@pytest.mark.parametrize("name", list(SHAPES))
def test_prefill_equals_token_by_token(files, name, version, threads):
    """150 tokens (three blocks of the C prefill), then one more token: the cache it reads
    must hold every prompt position."""
    e = CLlama.load(files[name, version], threads=threads)
    toks = prompt(e.args.vocab_size, 151)
    ref = token_by_token(e, toks)
    e.reset()
    last = e.prefill(toks[:150], 0)
    assert last.shape == (e.args.vocab_size,)
    assert np.abs(last - ref[149]).max() <= TOL[version]
    assert np.abs(e.forward(toks[150], 150) - ref[150]).max() <= TOL[version]
    e.reset()
    every = e.forward_tokens(toks, 0)
    assert every.shape == (151, e.args.vocab_size)
    assert np.abs(every - ref).max() <= TOL[version]
    e.reset()   # a prompt in two pieces: the second attends to the first one's cache
    e.prefill(toks[:37], 0)
    assert np.abs(e.prefill(toks[37:], 37) - ref[150]).max() <= TOL[version]


@pytest.mark.parametrize("version", [0, 2])
def test_prefill_is_token_by_token_bit_for_bit(files, version):
    """Each (row, token) sum of the prefill tiles (kernels.c) runs in the matvec's order and
    attention is the same function, so the logits are equal, not just close: 70 tokens (a last
    token tile of 4 fp32 / 2 int8), rows at the tiles' edges (vocab 301, 131; KV dim 20), at 1
    and 2 threads."""
    for name in ("gqa", "tails", "groups8", "gs4", "gs16", "wide"):
        for threads in (1, 2):
            e = CLlama.load(files[name, version], threads=threads)
            toks = prompt(e.args.vocab_size, 70, seed=4)
            ref = token_by_token(e, toks)
            e.reset()
            assert np.array_equal(e.forward_tokens(toks, 0), ref), (name, threads)


@pytest.mark.parametrize("version", [0, 2])
@pytest.mark.parametrize("name", list(SHAPES))
def test_numpy_prefill_equals_c_prefill(files, name, version):
    n, c = NumpyLlama.load(files[name, version]), CLlama.load(files[name, version], threads=2)
    toks = prompt(n.args.vocab_size, 100, seed=1)
    assert np.abs(n.prefill(toks, 0) - c.prefill(toks, 0)).max() <= TOL[version]
    assert np.abs(n.prefill(toks[:7], 100) - c.prefill(toks[:7], 100)).max() <= TOL[version]


@pytest.mark.parametrize("version", [0, 2])
@pytest.mark.parametrize("name", ["gqa", "tails"])
def test_greedy_continuations_identical(files, name, version):
    """Greedy generation after a prefilled prompt = after a prompt fed token by token, in C
    (Python loop and bl_generate) and in NumPy."""
    path = files[name, version]
    e = CLlama.load(path, threads=2)
    toks = [1, *prompt(e.args.vocab_size, 60, seed=2)]
    logits = token_by_token(e, toks)[-1]
    ref = []
    for pos in range(len(toks), 140):
        ref.append(int(np.argmax(logits)))
        logits = e.forward(ref[-1], pos)
    ref = ref[: next((i for i, t in enumerate(ref) if t in (1, 2)), len(ref))]
    assert len(ref) > 10
    assert list(e.generate(toks, 140, temperature=0.0))[: len(ref)] == ref
    assert e.generate_native(toks, 140, temperature=0.0)[: len(ref)] == ref
    assert list(NumpyLlama.load(path).generate(toks, 140, temperature=0.0))[: len(ref)] == ref


def test_forward_sample_is_forward_then_sample(files):
    from babyllama.inference_numpy import XorShiftRng

    e = CLlama.load(files["gqa", 2], threads=2)
    toks = prompt(e.args.vocab_size, 20, seed=3)
    e.prefill(toks[:-1], 0)
    a = e.forward_sample(toks[-1], 19, 0.9, 0.8, rng_a := XorShiftRng(5))
    e.reset()
    e.prefill(toks[:-1], 0)
    b = e.sample(e.forward(toks[-1], 19), 0.9, 0.8, rng_b := XorShiftRng(5))
    assert a == b and rng_a.state == rng_b.state


@pytest.mark.parametrize("engine", ["c", "numpy"])
def test_bad_input_is_a_clear_error(files, engine):
    path = files["mha", 0]
    e = CLlama.load(path, threads=1) if engine == "c" else NumpyLlama.load(path)
    with pytest.raises(ValueError, match="at least one token"):
        e.prefill([], 0)
    with pytest.raises(ValueError, match="token id 320 outside the vocabulary"):
        e.prefill([1, 5, 320], 0)
    with pytest.raises(ValueError, match="token id -1 outside the vocabulary"):
        e.prefill([1, -1], 0)
    with pytest.raises(ValueError, match="outside the context"):
        e.prefill([1] * 10, 155)
    with pytest.raises(ValueError, match="outside the context"):
        e.prefill([1], -1)
    with pytest.raises(ValueError, match="outside the context"):
        e.forward_tokens([1] * 161, 0)
    if engine == "c":
        with pytest.raises(ValueError, match=f"token id {2**40} outside the vocabulary"):
            e.prefill([1, 2**40], 0)


# ----------------------------------------------------------------------------------------------
# the int8 dot-product paths of csrc/simd.h

def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def _cc() -> str:
    return os.environ.get("CC") or "cc"


def _compiler_takes(flags: list[str]) -> bool:
    r = subprocess.run([_cc(), *flags, "-x", "c", "-c", "-", "-o", os.devnull],
                       input="int x;\n", capture_output=True, text=True)
    return r.returncode == 0


RUN = """
import sys, numpy as np
from babyllama.fast_c import CLlama, simd_path
out = {"path": np.array(simd_path())}
for i, f in enumerate(sys.argv[2:]):
    e = CLlama.load(f, threads=1)
    toks = np.random.default_rng(0).integers(3, e.args.vocab_size, 70).tolist()
    out[f"prefill{i}"] = e.forward_tokens(toks, 0)
    e.reset()
    out[f"forward{i}"] = np.stack([e.forward(t, j) for j, t in enumerate(toks)])
np.savez(sys.argv[1], **out)
"""


def run_with_path(tmp_path: Path, path: str, extra: str, models: list[Path]) -> dict:
    env = {**os.environ, "BABYLLAMA_CACHE": str(tmp_path / "cache"),
           "CFLAGS": f"{fast_c.DEFAULT_CFLAGS} {extra} -DBL_SIMD={path}".strip()}
    out = tmp_path / f"{path}.npz"
    subprocess.run([sys.executable, "-c", RUN, str(out), *map(str, models)], env=env, check=True)
    res = dict(np.load(out))
    assert str(res.pop("path")) == path
    return res


def simd_paths() -> list[tuple[str, str]]:
    """(path, extra flags) for every path this machine can run; vnni_emul runs anywhere."""
    flags, arm = cpu_flags(), os.uname().machine in ("aarch64", "arm64")
    paths = [("portable", ""), ("vnni_emul", "")]
    if {"avx2", "fma"} <= flags:
        paths.append(("avx2", ""))
    if "avx_vnni" in flags and _compiler_takes(["-mavxvnni"]):
        paths.append(("vnni", "-mavxvnni"))
    elif {"avx512_vnni", "avx512vl"} <= flags and _compiler_takes(["-mavx512vnni", "-mavx512vl"]):
        paths.append(("vnni", "-mavx512vnni -mavx512vl"))
    if arm:
        paths.append(("neon", ""))
        if "asimddp" in flags:
            paths.append(("sdot", "-march=armv8.2-a+dotprod"))
    return paths


def test_every_simd_path_gives_the_same_int8_results(tmp_path, files):
    """Group sums are exact int32 on every path: int8 logits are equal bit for bit across the
    paths (and to NumPy within the usual tolerance); fp32 ones differ only by summation order."""
    int8 = [files[name, 2] for name in ("gqa", "gs48", "tails", "groups8", "gs4", "gs16")]
    models = [*int8, files["gqa", 0]]
    results = {p: run_with_path(tmp_path, p, extra, models) for p, extra in simd_paths()}
    base = results.pop("portable")
    ref = NumpyLlama.load(models[0]).forward_tokens(
        np.random.default_rng(0).integers(3, 300, 70).tolist(), 0)
    assert np.abs(base["prefill0"] - ref).max() <= 1e-3
    for path, res in results.items():
        for i in range(len(int8)):
            for kind in ("prefill", "forward"):
                assert np.array_equal(res[f"{kind}{i}"], base[f"{kind}{i}"]), (path, kind, i)
        fp32 = f"prefill{len(int8)}"
        assert np.abs(res[fp32] - base[fp32]).max() <= 1e-4, path
    for path, res in [("portable", base), *results.items()]:   # the tiles keep the matvec's order
        for i in range(len(models)):
            assert np.array_equal(res[f"prefill{i}"], res[f"forward{i}"]), (path, i)


VNNI_FLAGS = [["-mavxvnni"], ["-mavx512vnni", "-mavx512vl"]]


@pytest.mark.parametrize("flags", VNNI_FLAGS, ids=["avxvnni", "avx512vnni"])
def test_vnni_path_compiles_warning_free(tmp_path, flags):
    """This CPU may not run vpdpbusd, but the path must build cleanly wherever it is chosen;
    the library built with it runs (and is compared) above when the CPU has the feature."""
    if os.uname().machine not in ("x86_64", "AMD64") or not _compiler_takes(flags):
        pytest.skip(f"{_cc()} cannot target {' '.join(flags)} here")
    srcs = [str(CSRC / s) for s in fast_c.LIB_SOURCES]
    for src in srcs:
        r = subprocess.run([_cc(), *fast_c.BASE_FLAGS, "-O3", "-mavx2", "-mfma", *flags,
                            "-DBL_SIMD=vnni", "-fopenmp", "-Werror", "-c", src, "-o",
                            str(tmp_path / "k.o")], capture_output=True, text=True)
        assert r.returncode == 0 and not r.stderr, r.stderr
    asm = subprocess.run([_cc(), *fast_c.BASE_FLAGS, "-O3", "-mavx2", "-mfma", *flags, "-S",
                          str(CSRC / "kernels.c"), "-o", "-"], capture_output=True, text=True)
    assert "vpdpbusd" in asm.stdout


def test_unknown_simd_path_is_a_clear_build_error(tmp_path):
    r = subprocess.run([_cc(), "-DBL_SIMD=avx1024", "-c", str(CSRC / "kernels.c"), "-o",
                        str(tmp_path / "k.o")], capture_output=True, text=True)
    assert r.returncode != 0 and "BL_SIMD must be one of" in r.stderr


def test_simd_kernels_are_sanitizer_clean(tmp_path, files):
    """ASan + UBSan on the SIMD paths this CPU runs (the CLI's sanitizer tests build without
    -march, so only the portable path): tests/cross_arch_driver.c's batched prefill, token-by-
    token steps and greedy generation on every shape, fp32 and int8, edge tiles included; the
    prefill logits equal the token-by-token ones bit for bit under the sanitizers too."""
    if subprocess.run([_cc(), "-fsanitize=address,undefined", "-x", "c", "-", "-o",
                       str(tmp_path / "probe")], input="int main(void){return 0;}",
                      text=True, capture_output=True).returncode != 0:
        pytest.skip("this compiler has no AddressSanitizer/UBSan runtime")
    driver = Path(__file__).resolve().with_name("cross_arch_driver.c")
    srcs = [str(driver), *(str(CSRC / s) for s in fast_c.LIB_SOURCES)]
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"}
    T = 45   # 7 fp32 token tiles of 6 and a last of 3; 11 int8 tiles of 4 and a last of 1
    paths = [(p, extra) for p, extra in simd_paths() if p not in ("portable", "vnni_emul")]
    if not paths:
        pytest.skip("this CPU runs no SIMD path (the CLI tests sanitize the portable one)")
    for path, extra in paths:
        exe = tmp_path / f"driver_{path}"
        # serial (sanitizers and OpenMP runtimes do not mix well), warnings are errors
        r = subprocess.run([_cc(), *fast_c.BASE_FLAGS, "-Werror", "-Wno-unknown-pragmas", "-O1",
                            "-g", "-march=native", *extra.split(), f"-DBL_SIMD={path}",
                            "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                            "-fno-omit-frame-pointer", f"-I{CSRC}", *srcs, "-o", str(exe), "-lm"],
                           capture_output=True, text=True)
        assert r.returncode == 0 and not r.stderr, r.stderr
        for (name, v), model in files.items():
            if name == "mha":   # its 64-wide groups: covered by gqa's 32 (the same SIMD code)
                continue
            toks = tmp_path / f"{name}.i32"
            np.array([1, *prompt(SHAPES[name][0].vocab_size, T - 1)], np.int32).tofile(toks)
            out = tmp_path / f"{name}_{v}_{path}.f32"
            r = subprocess.run([str(exe), str(model), "1", str(toks), str(out), "60"],
                               capture_output=True, text=True, env=env, timeout=300)
            assert r.returncode == 0 and "runtime error" not in r.stderr, (path, name, v, r.stderr)
            assert r.stdout.split("\n")[0] == path
            logits = np.fromfile(out, np.float32).reshape(2, T, -1)
            assert np.array_equal(logits[0], logits[1]), (path, name, v)
