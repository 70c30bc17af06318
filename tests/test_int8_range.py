"""Q8_0 values lie in [-127, 127]: the writer never emits -128, and both loaders refuse a v2
file holding one, with the same message (file, offset, tensor).

Why: the SIMD kernels (csrc/simd.h, avx2 and vnni) multiply unsigned by signed bytes and move
the sign across with _mm256_sign_epi8, which negates int8 values; -(-128) does not fit in an
int8, so a crafted -128 would make those paths differ from NumPy. Offsets here come from the
file layout (DESIGN.md), not from the readers under test."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fuzzing import tiny_weights, write_tiny
from helpers import c_quantize

from babyllama import fast_c
from babyllama.config import ModelArgs
from babyllama.export import ModelFileError, quantize_q80, read_model
from babyllama.fast_c import CError, CLlama
from babyllama.inference_numpy import NumpyLlama

A = ModelArgs(dim=8, hidden_dim=16, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=40,
              max_seq_len=16)
GS = 4
TINIEST = np.float32(1.4e-45)   # the smallest subnormal float32
CSRC = Path(fast_c.__file__).resolve().parents[2] / "csrc"


def layout(a: ModelArgs, gs: int, shared: bool) -> dict[str, tuple[int, int]]:
    """name -> (file offset of its int8 values, number of values), for a v2 file."""
    kv = a.n_kv_heads * a.head_dim
    off = 256 + 4 * a.dim * (2 * a.n_layers + 1)   # header, then the fp32 norms
    out = {"tok_embeddings": (off, a.vocab_size * a.dim)}
    off += a.vocab_size * a.dim * (1 + 4 // gs)
    for name, n in (("wq", a.dim * a.dim), ("wk", kv * a.dim), ("wv", kv * a.dim),
                    ("wo", a.dim * a.dim), ("w1", a.hidden_dim * a.dim),
                    ("w2", a.dim * a.hidden_dim), ("w3", a.hidden_dim * a.dim)):
        for layer in range(a.n_layers):
            out[f"layers.{layer}.{name}"] = (off, n)
            off += n + 4 * (n // gs)
    if not shared:
        out["output"] = (off, a.vocab_size * a.dim)
    return out


def crafted(tmp_path: Path, shared: bool, edits: dict[int, bytes]) -> Path:
    """A valid tiny v2 file with bytes overwritten at the given offsets."""
    path = write_tiny(tmp_path / "q.bin", 2, shared=shared, a=A, group_size=GS)
    raw = bytearray(path.read_bytes())
    end = max(o + n + 4 * (n // GS) for o, n in layout(A, GS, shared).values())
    assert end == len(raw)   # the layout above is the file's
    for off, data in edits.items():
        raw[off:off + len(data)] = data
    path.write_bytes(bytes(raw))
    return path


def both_refuse(path: Path) -> str:
    """The message both loaders give; they must give the same one."""
    with pytest.raises(ModelFileError) as py:
        NumpyLlama.load(path)
    with pytest.raises(CError) as c:
        CLlama.load(path, threads=1)
    assert str(c.value) == f"bad file format: {py.value}"
    return str(py.value)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("tensor", ["tok_embeddings", "layers.0.wq", "layers.1.wk",
                                    "layers.1.w2", "output"])
def test_minus_128_is_refused_by_both_loaders(tmp_path, tensor, where):
    shared = tensor != "output"
    off, n = layout(A, GS, shared)[tensor]
    at = off + {"first": 0, "middle": n // 2 + 1, "last": n - 1}[where]
    path = crafted(tmp_path, shared, {at: b"\x80"})
    msg = both_refuse(path)
    assert msg == (f"{path}: offset {at}: {tensor} holds the int8 value -128, outside the "
                   f"quantized range [-127, 127]")


def test_the_first_problem_in_file_order_is_the_one_reported(tmp_path):
    lay = layout(A, GS, True)
    wq_off, wq_n = lay["layers.0.wq"]
    nan_scale = struct.pack("<f", float("nan"))
    # a NaN scale of layers.0.wq comes before a -128 in layers.1.w3
    scale_at = wq_off + wq_n + 4
    path = crafted(tmp_path, True, {scale_at: nan_scale, lay["layers.1.w3"][0] + 5: b"\x80"})
    assert f"offset {scale_at}: layers.0.wq has a scale that is not finite" in both_refuse(path)
    # within one tensor the values come before the scales
    path = crafted(tmp_path, True, {scale_at: nan_scale, wq_off + 9: b"\x80"})
    assert f"offset {wq_off + 9}: layers.0.wq holds the int8 value -128" in both_refuse(path)


def test_plus_and_minus_127_are_accepted(tmp_path):
    """The ends of the range load, and the engines agree on them (the edge of the sign trick)."""
    lay = layout(A, GS, False)
    edits = {}
    for name in ("tok_embeddings", "layers.0.wq", "layers.1.w2", "output"):
        off, n = lay[name]
        edits[off] = bytes([0x81, 0x7F, 0x81, 0x81] * (n // 4))   # -127, 127, -127, -127
    path = crafted(tmp_path, False, edits)
    _, w = read_model(path)
    assert w["layers.0.wq"].min() == -127 and w["layers.0.wq"].max() == 127
    n, c = NumpyLlama.load(path), CLlama.load(path, threads=1)
    toks = [1, 5, 7, 30, 2, 11]
    assert np.abs(n.forward_tokens(toks, 0) - c.forward_tokens(toks, 0)).max() <= 1e-3


def subnormal_groups() -> np.ndarray:
    """Groups whose max|w| is a few hundred times the smallest subnormal: max|w| / 127 rounds
    to a scale that is too small (e.g. 190 ulps / 127 -> 1 ulp), so w / scale passes 127."""
    rows = []
    for k in (127, 128, 129, 190, 254, 255, 300, 381):
        rows.append([-k, 1, 0, 3])
        rows.append([k, -1, -k, 2])
    return (np.array(rows, dtype=np.float32) * TINIEST).astype(np.float32)


def test_quantizer_stays_within_plus_minus_127():
    rng = np.random.default_rng(0)
    magnitude = 10.0 ** rng.integers(-30, 30, (500, 1))
    normal = (rng.standard_normal((500, GS)) * magnitude).astype(np.float32)
    extremes = np.array([[-1, 1, 0.5, -0.5], [-3e38, 3e38, 1, 0], [0, 0, 0, 0],
                         [-2.0, 1, 1, 1]], dtype=np.float32)   # -max alone must map to -127
    for w in (normal, extremes, subnormal_groups()):
        q, s, _ = quantize_q80(w, GS)
        q = q.reshape(-1, GS)
        assert q.min() >= -127 and q.max() <= 127
        # no wrap-around: every value keeps its sign (or rounds to 0)
        assert np.all((np.sign(q) == np.sign(w)) | (q == 0))
    q, s, _ = quantize_q80(extremes, GS)
    assert q.reshape(-1, GS)[3, 0] == -127 and q.reshape(-1, GS)[0, 0] == -127
    q, s, _ = quantize_q80(normal, GS)   # the usual bound where scales are normal floats
    err = np.abs(q.reshape(-1, GS).astype(np.float64) * s[:, None] - normal)
    assert np.all(err <= s[:, None].astype(np.float64) * (0.5 + 1e-5))


def test_written_file_with_subnormal_weights_loads_in_both(tmp_path):
    """Before the writer clipped, these groups came out as -128 (refused) or wrapped around."""
    w = tiny_weights(A)
    wq = w["layers.0.wq"].copy()
    wq[:4].reshape(-1, GS)[:] = subnormal_groups()[:8]
    path = write_tiny(tmp_path / "sub.bin", 2, a=A, group_size=GS, **{"layers.0.wq": wq})
    _, r = read_model(path)
    q = np.asarray(r["layers.0.wq"])
    assert q.min() >= -127 and q.max() <= 127
    assert np.all((np.sign(q[:4]) == np.sign(wq[:4])) | (q[:4] == 0))
    n, c = NumpyLlama.load(path), CLlama.load(path, threads=1)
    toks = [1, 3, 9, 27]
    assert np.abs(n.forward_tokens(toks, 0) - c.forward_tokens(toks, 0)).max() <= 1e-3


# ----------------------------------------------------------------------------------------------
# the SIMD group sums at the ends of the range

IDOT_DRIVER = Path(__file__).resolve().with_name("idot_driver.c")
IDOT_SHAPES = [(4, 17), (8, 9), (16, 9), (32, 9), (48, 9), (64, 9)]   # (gs, ngroups): 8 groups
# at once (narrow groups: one vector of 8 group sums), then the rest


def extreme_rows(gs: int, ngroups: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, w), int8 (rows, ngroups * gs): the largest products of either sign, alternating
    signs, zeros, and random values of the whole range [-127, 127]."""
    n = gs * ngroups
    rng = np.random.default_rng(gs)
    alt = np.where(np.arange(n) % 2, 127, -127)
    pairs = [(127, 127), (-127, 127), (127, -127), (-127, -127), (alt, alt), (alt, -alt),
             (alt, 127), (0, -127)]
    x = [np.broadcast_to(a, n) for a, _ in pairs]
    w = [np.broadcast_to(b, n) for _, b in pairs]
    for _ in range(6):
        x.append(rng.integers(-127, 128, n))
        w.append(rng.choice([-127, -126, -1, 0, 1, 126, 127], n))
    return np.array(x, dtype=np.int8), np.array(w, dtype=np.int8)


def idot_data(path: Path, gs: int, ngroups: int) -> Path:
    x, w = extreme_rows(gs, ngroups)
    with open(path, "wb") as f:
        f.write(np.array([gs, ngroups, len(x)], dtype=np.int32).tobytes())
        for xr, wr in zip(x, w):
            f.write(xr.tobytes() + wr.tobytes())
    return path


def check_idot_output(out: str, path: str, gs: int, ngroups: int) -> None:
    """The driver's group sums and row sums against NumPy's int64 ones."""
    lines = out.splitlines()
    assert lines[0] == path
    x, w = extreme_rows(gs, ngroups)
    groups = (x.astype(np.int64) * w).reshape(len(x), ngroups, gs).sum(axis=-1)
    got = np.array([[float(v) for v in ln.split()] for ln in lines[1:]])
    assert np.array_equal(got[:, :-1], groups), (path, gs)
    assert np.array_equal(got[:, -1], groups.sum(axis=-1)), (path, gs)   # all below 2^24


def host_paths() -> dict[str, list[str]]:
    """The SIMD paths this CPU runs, with their compiler flags."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    paths = {"portable": [], "vnni_emul": []}
    if {"avx2", "fma"} <= flags:
        paths["avx2"] = ["-mavx2", "-mfma"]
        paths["vnni_emul"] = ["-mavx2", "-mfma"]   # the AVX2 fp32 kernels beside it, as built
    if "avx_vnni" in flags:
        paths["vnni"] = ["-mavx2", "-mfma", "-mavxvnni"]
    elif {"avx512_vnni", "avx512vl"} <= flags:
        paths["vnni"] = ["-mavx2", "-mfma", "-mavx512vnni", "-mavx512vl"]
    if os.uname().machine in ("aarch64", "arm64"):
        paths["neon"] = []
        if "asimddp" in flags:
            paths["sdot"] = ["-march=armv8.2-a+dotprod"]
    return paths


def test_group_sums_are_exact_over_the_whole_range(tmp_path):
    """Every path this CPU runs (tests/test_cross_arch.py runs the ARM ones under QEMU): the
    sign trick and the 16-bit pair sums of avx2 must not saturate at +-127 * +-127."""
    cc = os.environ.get("CC") or "cc"
    for path, flags in host_paths().items():
        exe = tmp_path / f"idot_{path}"
        r = subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-O3", *flags,
                            f"-DBL_SIMD={path}", f"-I{CSRC}", str(IDOT_DRIVER), "-o", str(exe)],
                           capture_output=True, text=True)
        assert r.returncode == 0 and not r.stderr, r.stderr
        for gs, ngroups in IDOT_SHAPES:
            data = idot_data(tmp_path / f"{gs}.bin", gs, ngroups)
            out = subprocess.run([str(exe), str(data)], capture_output=True, text=True, check=True)
            check_idot_output(out.stdout, path, gs, ngroups)


def test_activation_quantizers_stay_in_range_and_agree_on_subnormal_groups():
    """Activations too: with a subnormal max|x| the rounded scale can fall below max|x|/127,
    and x/scale rounds past 127 (NumPy would wrap to 66 or -128; C's conversion would be
    undefined). Both quantizers clip to [-127, 127] and give the same bytes."""
    from babyllama.inference_numpy import quantize_rows

    x = np.zeros(4 * GS, np.float32)
    for g, k in enumerate((190, -190, 128, -128)):     # multiples of the smallest subnormal
        x[g * GS] = np.float32(k) * TINIEST
    ref_scale = (np.abs(x.reshape(-1, GS)).max(axis=1) / np.float32(127)).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        unclipped = np.rint(x.reshape(-1, GS)[:, 0] / ref_scale)
    assert np.abs(unclipped).max() > 127        # the case is real: unclipped values leave int8
    q, s = c_quantize(x, GS)
    q_np, s_np = quantize_rows(x, GS)
    assert np.array_equal(s, s_np)
    assert np.array_equal(q, q_np)
    assert q.min() >= -127 and q.max() <= 127
    assert list(q[::GS]) == [127, -127, 127, -127]


def test_activation_quantizer_of_narrow_groups_equals_numpy():
    """4-wide groups are quantized two at a time (quantize.c): every kind of group beside every
    other (normal, zero, -0.0, subnormal, huge, infinite, NaN) and a last group alone give
    NumPy's bytes and scales; 8-wide groups (one vector each) likewise."""
    from babyllama.inference_numpy import quantize_rows

    kinds = [[0.3, -1.5, 2.0, 0.01], [0, 0, 0, 0], [-0.0, 0, -0.0, 0],
             [190 * TINIEST, -3 * TINIEST, 0, TINIEST], [3e38, -3e38, 1, 0],
             [np.inf, 1, 2, 3], [1, np.nan, 2, 3], [-2.0, 1, 1, 1]]
    pairs = [a + b for a in kinds for b in kinds] + [kinds[0]]   # 129 groups: a tail of one
    rng = np.random.default_rng(7)
    for x, gs in ((np.array([v for p in pairs for v in p], np.float32), 4),
                  (rng.standard_normal(4 * 8 * 33).astype(np.float32), 4),
                  (rng.standard_normal(8 * 33).astype(np.float32), 8)):
        with np.errstate(invalid="ignore", over="ignore"):
            q_np, s_np = quantize_rows(x, gs)
        q, s = c_quantize(x, gs)
        assert np.array_equal(s, s_np, equal_nan=True), gs
        assert np.array_equal(q, q_np), gs
