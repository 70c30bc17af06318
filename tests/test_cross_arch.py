"""The SIMD paths this CPU cannot execute, executed under an emulator and compared with NumPy.

csrc/simd.h picks an int8 dot-product path at compile time; tests/test_prefill.py runs those
the host CPU has. Here the ARM ones (neon: vmull_s8 + vpadal; sdot: vdotq_s32) are
cross-compiled with aarch64-linux-gnu-gcc into tests/cross_arch_driver.c and run under
qemu-aarch64 -cpu max (which has the dot-product extension), on shapes with grouped-query
attention, 64/32/48/8-wide Q8_0 groups and odd sizes, fp32 (v0) and Q8_0 (v2), a batched
prefill, token-by-token decoding and greedy generation. The x86 vnni path (vpdpbusd) runs on
the host when its CPU has AVX-VNNI or AVX-512 VNNI, else under qemu-x86_64 when that emulates
the instruction (QEMU 7.2 does not: the test says so and skips).

Group sums are exact int32 on every path, so int8 logits are equal bit for bit across the paths
of one build; fp32 ones differ by summation order only. Against NumPy (on the host): 1e-3 for
int8, 1e-4 for fp32, and the same greedy tokens.

The tools: `make cross-tools` (Debian/Ubuntu, as root); without them the tests skip."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import scaled_model
from test_int8_range import IDOT_DRIVER, IDOT_SHAPES, check_idot_output, idot_data

from babyllama import fast_c
from babyllama.export import write_model
from babyllama.inference_numpy import NumpyLlama
from babyllama.model import ModelArgs

CSRC = Path(fast_c.__file__).resolve().parents[2] / "csrc"
DRIVER = Path(__file__).resolve().with_name("cross_arch_driver.c")
TOL = {0: 1e-4, 2: 1e-3}   # fp32, int8
T, STEPS = 40, 100   # prompt tokens, positions generated up to

# (args, Q8_0 group size, versions): as in test_prefill.py, fp32 on two of them
SHAPES = {
    "mha": (ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=320,
                      max_seq_len=128, hidden_dim=192), 64, (2,)),
    "gqa": (ModelArgs(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=300,
                      max_seq_len=128, hidden_dim=160), 32, (0, 2)),
    "gs48": (ModelArgs(dim=96, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256,
                       max_seq_len=128, hidden_dim=192), 48, (2,)),
    "tails": (ModelArgs(dim=40, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=301,
                        max_seq_len=128, hidden_dim=88), 8, (0, 2)),
    # rows longer than the fp32 tile's 512-value K blocks, with tails (kernels.c)
    "wide": (ModelArgs(dim=524, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=150,
                       max_seq_len=128, hidden_dim=1100), 4, (0,)),
}

ARM_CC, ARM_QEMU, ARM_SYSROOT = "aarch64-linux-gnu-gcc", "qemu-aarch64", "/usr/aarch64-linux-gnu"
ARM_PATHS = {"portable": "-march=armv8-a", "neon": "-march=armv8-a",
             "sdot": "-march=armv8.2-a+dotprod"}   # -march for the sources that see simd.h
VNNI = {"avxvnni": (["-mavxvnni"], "avx_vnni"),
        "avx512vnni": (["-mavx512vnni", "-mavx512vl"], "avx512_vnni")}


class Model:
    """A model file, its prompt and NumPy's answers for it."""

    def __init__(self, path: Path, version: int, vocab: int, seed: int, threads: int):
        self.path, self.version, self.threads = path, version, threads
        toks = np.random.default_rng(seed).integers(3, vocab, T).astype(np.int32)
        toks[0] = 1   # BOS, as a real prompt starts
        self.tokens = path.with_suffix(".i32")
        toks.tofile(self.tokens)
        n = NumpyLlama.load(path)
        self.logits = n.forward_tokens(toks.tolist(), 0)
        n.reset()
        self.ids = list(n.generate(toks.tolist(), STEPS, temperature=0.0))
        assert len(self.ids) > 10   # long enough to tell a wrong path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Model]:
    d = tmp_path_factory.mktemp("cross")
    out = []
    for i, (name, (args, gs, versions)) in enumerate(SHAPES.items()):
        m = scaled_model(args, 2.0)
        for v in versions:
            path = write_model(m, d / f"{name}_v{v}.bin", version=v, group_size=gs)
            # two OpenMP threads on one shape; one elsewhere (an idle OpenMP thread spins,
            # and spinning under an emulator is slow)
            out.append(Model(path, v, args.vocab_size, seed=i, threads=2 if name == "gqa" else 1))
    return out


def simd_sources() -> list[str]:
    """The library's sources that see the SIMD path (they include simd.h, directly or
    through a header); the others are compiled once for all paths."""
    headers = [h for h in fast_c.HEADERS if '"simd.h"' in (CSRC / h).read_text() or h == "simd.h"]
    return [s for s in fast_c.LIB_SOURCES
            if any(f'"{h}"' in (CSRC / s).read_text() for h in headers)]


def compile_objects(cc: str, flags: list[str], sources: list[Path], d: Path) -> list[Path]:
    """Object files, each compiled warning-free with the engine's flags (fast_c.BASE_FLAGS)."""
    d.mkdir(parents=True, exist_ok=True)
    objs = []
    for src in sources:
        obj = d / f"{src.stem}.o"
        cmd = [cc, *fast_c.BASE_FLAGS, "-Werror", "-O3", *flags, "-fopenmp", f"-I{CSRC}", "-c",
               str(src), "-o", str(obj)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0 and not r.stderr, f"$ {' '.join(cmd)}\n{r.stderr}"
        objs.append(obj)
    return objs


def build_paths(cc: str, base: list[str], paths: dict[str, list[str]], d: Path) -> dict[str, Path]:
    """The driver linked once per SIMD path: {path: executable}, `paths` giving each path's
    compiler flags on top of `base`."""
    per_path = simd_sources()
    common = compile_objects(cc, base, [DRIVER, *(CSRC / s for s in fast_c.LIB_SOURCES
                                                  if s not in per_path)], d / "common")
    exes = {}
    for path, flags in paths.items():
        objs = compile_objects(cc, [*base, *flags, f"-DBL_SIMD={path}"],
                               [CSRC / s for s in per_path], d / path)
        exe = exes[path] = d / f"driver_{path}"
        r = subprocess.run([cc, "-fopenmp", *map(str, common + objs), "-o", str(exe), "-lm"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    return exes


def run(prefix: list[str], exe: Path, m: Model, out: Path) -> tuple[str, np.ndarray, list[int]]:
    """(path the build reports, logits (2, T, vocab): batched then token by token, greedy ids)"""
    r = subprocess.run([*prefix, str(exe), str(m.path), str(m.threads), str(m.tokens), str(out),
                        str(STEPS)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{exe.name} on {m.path.name}: {r.stderr}"
    path, ids = r.stdout.split("\n")[:2]
    return path, np.fromfile(out, np.float32).reshape(2, T, -1), [int(t) for t in ids.split()]


def check_paths(results: dict[str, dict], models: list[Model]) -> None:
    """Every path against NumPy, its batched prefill against its token-by-token logits bit for
    bit, and every int8 path against the portable one bit for bit."""
    for i, m in enumerate(models):
        base = results["portable"][i][1]
        for path, res in results.items():
            name, logits, ids = res[i]
            where = f"{path} on {m.path.name}"
            assert name == path, where
            for k, kind in enumerate(("batched prefill", "token by token")):
                err = np.abs(logits[k] - m.logits).max()
                assert err <= TOL[m.version], f"{where}, {kind}: {err:.3g} from NumPy"
            # each (row, token) sum of the prefill tiles runs in the matvec's order
            assert np.array_equal(logits[0], logits[1]), f"{where}: prefill != token by token"
            if m.version == 2:
                assert np.array_equal(logits, base), f"{where}: not the portable path's bits"
            assert ids == m.ids, f"{where}: greedy tokens differ from NumPy's"


# ----------------------------------------------------------------------------------------------
# ARM under qemu-aarch64

def arm_missing() -> str | None:
    for tool in (ARM_CC, ARM_QEMU):
        if not shutil.which(tool):
            return f"{tool} not installed (make cross-tools)"
    if not Path(ARM_SYSROOT, "lib").is_dir():
        return f"no aarch64 C library in {ARM_SYSROOT} (make cross-tools)"
    return None


@pytest.fixture(scope="module")
def arm_builds(tmp_path_factory) -> dict[str, Path]:
    if reason := arm_missing():
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("arm")
    return build_paths(ARM_CC, ["-march=armv8-a"],
                       {p: [march] for p, march in ARM_PATHS.items()}, d)


def test_arm_paths_match_numpy_under_qemu(arm_builds, models, tmp_path):
    prefix = [ARM_QEMU, "-cpu", "max", "-L", ARM_SYSROOT]
    results = {p: [run(prefix, exe, m, tmp_path / f"{p}_{i}.f32") for i, m in enumerate(models)]
               for p, exe in arm_builds.items()}
    check_paths(results, models)


def test_arm_builds_use_their_instructions(arm_builds):
    """The sdot build really contains sdot and the neon one the widening multiplies (with
    -march=armv8-a the compiler cannot have chosen sdot by itself)."""
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if not objdump:
        pytest.skip("aarch64-linux-gnu-objdump not installed (make cross-tools)")

    def mnemonics(exe: Path) -> set[str]:
        asm = subprocess.run([objdump, "-d", str(exe)], capture_output=True, text=True).stdout
        return {f[2].split()[0] for ln in asm.splitlines() if len(f := ln.split("\t")) > 2}

    sdot, neon = mnemonics(arm_builds["sdot"]), mnemonics(arm_builds["neon"])
    assert "sdot" in sdot and "sdot" not in neon
    assert {"smull", "smull2"} & neon and "sadalp" in neon



def test_arm_group_sums_are_exact_over_the_whole_range(tmp_path):
    """tests/test_int8_range.py's check of the group sums at +-127, on the ARM paths."""
    if reason := arm_missing():
        pytest.skip(reason)
    for path, march in ARM_PATHS.items():
        exe = tmp_path / f"idot_{path}"
        r = subprocess.run([ARM_CC, "-std=c11", "-Wall", "-Wextra", "-Werror", "-O3", march,
                            f"-DBL_SIMD={path}", f"-I{CSRC}", str(IDOT_DRIVER), "-o", str(exe)],
                           capture_output=True, text=True)
        assert r.returncode == 0 and not r.stderr, r.stderr
        for gs, ngroups in IDOT_SHAPES:
            data = idot_data(tmp_path / f"{gs}.bin", gs, ngroups)
            out = subprocess.run([ARM_QEMU, "-cpu", "max", "-L", ARM_SYSROOT, str(exe), str(data)],
                                 capture_output=True, text=True, check=True, timeout=60)
            check_idot_output(out.stdout, path, gs, ngroups)

# ----------------------------------------------------------------------------------------------
# x86 vnni: on the host when it has the instructions, else under qemu-x86_64 if it can

def x86_cc(flags: list[str]) -> str | None:
    cc = os.environ.get("CC") or "cc"
    if os.uname().machine not in ("x86_64", "AMD64"):
        return None
    r = subprocess.run([cc, *flags, "-x", "c", "-c", "-", "-o", os.devnull], input="int x;\n",
                       capture_output=True, text=True)
    return cc if r.returncode == 0 else None


PROBE = """#include <immintrin.h>
#include <stdio.h>
int main(void) {
    __m256i acc = _mm256_set1_epi32(7), u = _mm256_set1_epi8(3), s = _mm256_set1_epi8(-5);
#ifdef __AVXVNNI__
    acc = _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    acc = _mm256_dpbusd_epi32(acc, u, s);
#endif
    printf("%d\\n", _mm256_extract_epi32(acc, 0));
    return 0;
}
"""


def vnni_runner(cc: str, flags: list[str], feature: str, d: Path) -> tuple[list[str], str]:
    """(command prefix to run a vnni program, '') or ([], why it cannot run here)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and feature in cpuinfo.read_text().split():
        return [], ""
    qemu = shutil.which("qemu-x86_64")
    if not qemu:
        return [], f"this CPU has no {feature}, and qemu-x86_64 is not installed"
    src, exe = d / "probe.c", d / "probe"
    src.write_text(PROBE)
    subprocess.run([cc, "-O2", "-mavx2", *flags, str(src), "-o", str(exe)], check=True)
    r = subprocess.run([qemu, "-cpu", "max", str(exe)], capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip() == str(7 + 4 * 3 * -5):
        return [qemu, "-cpu", "max"], ""
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    said = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
    return [], (f"this CPU has no {feature}, and {version.splitlines()[0]} -cpu max does not "
                f"execute vpdpbusd ({' '.join(flags)}): {said}")


@pytest.mark.parametrize("kind", list(VNNI))
def test_vnni_path_matches_numpy(kind, models, tmp_path):
    """(That the vnni build compiles warning-free wherever the compiler can target it, even on
    a CPU that cannot run it, is test_prefill.py's test_vnni_path_compiles_warning_free.)"""
    flags, feature = VNNI[kind]
    cc = x86_cc(flags)
    if not cc:
        pytest.skip(f"no x86 compiler here that takes {' '.join(flags)}")
    prefix, why = vnni_runner(cc, flags, feature, tmp_path)
    if why:
        pytest.skip(why)
    exes = build_paths(cc, ["-mavx2", "-mfma"], {"portable": [], "vnni": flags}, tmp_path)
    results = {p: [run(prefix if p == "vnni" else [], exe, m, tmp_path / f"{p}_{i}.f32")
                   for i, m in enumerate(models)]
               for p, exe in exes.items()}
    check_paths(results, models)
