"""Chapter 06: the C/OpenMP kernel (csrc/), compiled on first use and loaded with ctypes.

    from babyllama.fast_c import CLlama
    engine = CLlama.load("out/model.bin", threads=2)   # same interface as NumpyLlama
    logits = engine.forward(token=1, pos=0)

    babyllama generate out/model.bin -z out/tok512.bin -i "Once upon" --engine c
    make -C csrc                                        # the same library and a run.c-style CLI

The shared library is built from the sources next to this package (never the working
directory) into a cache ($BABYLLAMA_CACHE or ~/.cache/babyllama), named by a hash of the
sources, compiler and flags, so editing a .c file or setting CC/CFLAGS rebuilds it. OpenMP is
used when the compiler has it (macOS: Homebrew's libomp), and the build works without it.
"""

from __future__ import annotations

import ctypes as C
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np

from babyllama.config import ModelArgs
from babyllama.context import check_generate_args
from babyllama.inference_numpy import NonFiniteError, XorShiftRng, check_sampling, random_seed

CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"
LIB_SOURCES = ("kernels.c", "quantize.c", "model.c", "prefill.c", "tokenizer.c", "context.c")
HEADERS = ("babyllama.h", "kernels.h", "model.h", "simd.h")
BASE_FLAGS = ["-std=c11", "-fPIC", "-ffp-contract=off", "-Wall", "-Wextra"]
DEFAULT_CFLAGS = "-O3 -march=native"
ERRORS = {1: "I/O error", 2: "bad file format", 3: "bad argument", 4: "out of memory",
          5: "stopped", 6: "non-finite logits"}


class BuildError(RuntimeError):
    pass


class CError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# building

def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise BuildError(f"no C compiler: {cmd[0]!r} was not found. Install gcc or clang (or "
                         f"Xcode's command line tools on macOS), or set CC") from e


def _compiles(cc: str, flags: list[str], code: str, link: list[str] = ()) -> bool:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "t.c"
        src.write_text(code)
        return _run([cc, *flags, str(src), "-o", str(Path(d) / "t"), *link]).returncode == 0


@cache
def openmp_flags(cc: str) -> tuple[list[str], list[str]]:
    """(compile flags, link flags) that enable OpenMP with `cc`, or ([], []) without it."""
    if os.environ.get("BABYLLAMA_OPENMP", "1") == "0":
        return [], []
    code = "#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n"
    if _compiles(cc, ["-fopenmp"], code, ["-fopenmp"]):
        return ["-fopenmp"], ["-fopenmp"]
    if platform.system() == "Darwin":   # Apple clang: OpenMP through Homebrew's libomp
        for prefix in ("/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"):
            inc, lib = f"-I{prefix}/include", f"-L{prefix}/lib"
            if _compiles(cc, ["-Xpreprocessor", "-fopenmp", inc], code, [lib, "-lomp"]):
                return ["-Xpreprocessor", "-fopenmp", inc], [lib, "-lomp"]
    return [], []


def build_flags() -> tuple[str, list[str], list[str]]:
    """(compiler, compile flags, link flags) from CC/CFLAGS and what the compiler supports."""
    cc = os.environ.get("CC") or ("cc" if shutil.which("cc") else "gcc")
    cflags = os.environ.get("CFLAGS", DEFAULT_CFLAGS).split()
    if "-march=native" in cflags and not _compiles(cc, ["-march=native"], "int main(void){}"):
        cflags.remove("-march=native")   # e.g. Apple clang on arm64 before version 15
    omp_c, omp_l = openmp_flags(cc)
    serial = [] if omp_c else ["-Wno-unknown-pragmas"]   # the pragmas are simply ignored
    return cc, [*BASE_FLAGS, *cflags, *omp_c, *serial], omp_l


def cache_dir() -> Path:
    return Path(os.environ.get("BABYLLAMA_CACHE", Path.home() / ".cache" / "babyllama"))


def build_library(extra_cflags: tuple[str, ...] = (), out_dir: Path | None = None) -> Path:
    """Compile csrc/ into a shared library, unless the cached one is up to date."""
    cc, cflags, ldflags = build_flags()
    cflags = [*cflags, *extra_cflags]
    h = hashlib.sha256()
    for name in (*LIB_SOURCES, *HEADERS):
        path = CSRC / name
        if not path.exists():
            raise BuildError(f"C source {path} is missing; is babyllama installed from a "
                             f"checkout (pip install -e .)?")
        h.update(name.encode() + path.read_bytes())
    version = _run([cc, "--version"]).stdout
    h.update(" ".join([cc, version, *cflags, *ldflags]).encode())
    ext = ".dylib" if platform.system() == "Darwin" else ".so"
    out_dir = out_dir or cache_dir()
    lib = out_dir / f"libbabyllama-{h.hexdigest()[:16]}{ext}"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")
    cmd = [cc, *cflags, "-shared", *(str(CSRC / s) for s in LIB_SOURCES), "-o", str(tmp),
           *ldflags, "-lm"]
    res = _run(cmd)
    if res.returncode != 0:
        raise BuildError(f"compiling the C kernel failed:\n$ {' '.join(cmd)}\n{res.stderr}")
    os.replace(tmp, lib)
    return lib


# ----------------------------------------------------------------------------------------------
# loading: every function gets its argtypes and restype

_f32p = np.ctypeslib.ndpointer(np.float32, ndim=1, flags="C_CONTIGUOUS")
_i32p = np.ctypeslib.ndpointer(np.int32, ndim=1, flags="C_CONTIGUOUS")
TOKEN_CB = C.CFUNCTYPE(C.c_int, C.c_int, C.c_void_p)


@cache
def load_library(path: str | None = None) -> C.CDLL:
    lib = C.CDLL(path or str(build_library()))
    vp, i, f, ep = C.c_void_p, C.c_int, C.c_float, C.c_char_p
    sigs = {
        "bl_model_open": ([ep, i, C.POINTER(vp), ep, C.c_size_t], i),
        "bl_model_close": ([vp], None),
        "bl_model_config": ([vp, _i32p], i),
        "bl_model_error": ([vp], ep),
        "bl_set_threads": ([vp, i], i),
        "bl_reset": ([vp], i),
        "bl_forward": ([vp, i, i, _f32p], i),
        "bl_prefill": ([vp, _i32p, i, i, _f32p], i),
        "bl_forward_batch": ([vp, _i32p, i, i, _f32p], i),
        "bl_forward_sample": ([vp, i, i, f, f, C.POINTER(C.c_uint64), C.POINTER(i)], i),
        "bl_simd": ([], ep),
        "bl_fork_join_seconds": ([i, i], C.c_double),
        "bl_sample": ([vp, _f32p, f, f, C.POINTER(C.c_uint64), C.POINTER(i)], i),
        "bl_random_u32": ([C.POINTER(C.c_uint64)], C.c_uint32),
        "bl_generate": ([vp, _i32p, i, i, f, f, C.c_uint64, i, TOKEN_CB, vp, C.POINTER(i)], i),
        "bl_context_open": ([vp, i, i, C.POINTER(vp), ep, C.c_size_t], i),
        "bl_context_close": ([vp], None),
        "bl_context_error": ([vp], ep),
        "bl_context_generate": ([vp, _i32p, i, i, f, f, C.POINTER(C.c_uint64), _i32p,
                                 C.POINTER(i)], i),
        "bl_tokenizer_open": ([ep, i, C.POINTER(vp), ep, C.c_size_t], i),
        "bl_tokenizer_close": ([vp], None),
        "bl_tokenizer_error": ([vp], ep),
        "bl_encode": ([vp, ep, i, i, _i32p, i, C.POINTER(i)], i),
        "bl_decode": ([vp, i, i, C.POINTER(C.c_void_p), C.POINTER(C.c_size_t)], i),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def _open(opener, path: str | Path, arg: int) -> C.c_void_p:
    lib = load_library()
    handle, err = C.c_void_p(), C.create_string_buffer(1024)
    rc = getattr(lib, opener)(str(path).encode(), arg, C.byref(handle), err, len(err))
    if rc != 0:
        raise CError(f"{ERRORS.get(rc, rc)}: {err.value.decode(errors='replace')}")
    return handle


# ----------------------------------------------------------------------------------------------
# the engine

def simd_path() -> str:
    """The int8 dot-product path the library was built with (csrc/simd.h)."""
    return load_library().bl_simd().decode()


class CLlama:
    """The C kernel behind the interface of NumpyLlama."""

    def __init__(self, handle: C.c_void_p, threads: int):
        self._lib, self._h = load_library(), handle
        cfg = np.zeros(10, dtype=np.int32)
        self._lib.bl_model_config(self._h, cfg)
        dim, hidden, layers, heads, kv, vocab, seq, self.version, self.group_size, shared = (
            int(v) for v in cfg)
        self.args = ModelArgs(dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads,
                              n_kv_heads=kv, vocab_size=vocab, max_seq_len=seq)
        self.shared_classifier = bool(shared)
        self.threads = threads
        self._logits = np.zeros(vocab, dtype=np.float32)

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> CLlama:
        threads = threads or os.cpu_count() or 1
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        return cls(_open("bl_model_open", path, threads), threads)

    def close(self) -> None:
        if self._h:
            self._lib.bl_model_close(self._h)
            self._h = None

    def __del__(self):
        self.close()

    def _check(self, rc: int) -> None:
        if rc != 0:
            msg = self._lib.bl_model_error(self._h).decode(errors="replace")
            raise {3: ValueError, 6: NonFiniteError}.get(rc, CError)(msg)

    def reset(self) -> None:
        self._check(self._lib.bl_reset(self._h))

    def forward(self, token: int, pos: int) -> np.ndarray:
        self._check(self._lib.bl_forward(self._h, int(token), int(pos), self._logits))
        return self._logits.copy()

    def _ids(self, tokens: list[int]) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max):
            bad = ids[(ids < 0) | (ids >= self.args.vocab_size)][0]
            raise ValueError(f"token id {bad} outside the vocabulary [0, {self.args.vocab_size})")
        return ids.astype(np.int32)

    def prefill(self, tokens: list[int], pos: int) -> np.ndarray:
        """Logits (vocab,) of the last of `tokens` at positions pos..; the whole prompt goes
        through each layer at once (matrix-matrix products) and fills the KV cache."""
        ids = self._ids(tokens)
        self._check(self._lib.bl_prefill(self._h, ids, ids.size, int(pos), self._logits))
        return self._logits.copy()

    def forward_tokens(self, tokens: list[int], pos: int) -> np.ndarray:
        """Logits (T, vocab) of tokens at positions pos.., all at once like prefill."""
        ids = self._ids(tokens)
        out = np.empty(max(ids.size, 1) * self.args.vocab_size, dtype=np.float32)
        self._check(self._lib.bl_forward_batch(self._h, ids, ids.size, int(pos), out))
        return out.reshape(ids.size, self.args.vocab_size)

    def forward_sample(self, token: int, pos: int, temperature: float, topp: float,
                       rng: XorShiftRng) -> int:
        """The next token after `token` at `pos`: forward and sample in one C call (what a
        per-token loop needs, without the logits crossing into Python)."""
        state, tok = C.c_uint64(rng.state), C.c_int()
        self._check(self._lib.bl_forward_sample(self._h, int(token), int(pos), temperature, topp,
                                                C.byref(state), C.byref(tok)))
        rng.state = state.value
        return tok.value

    def sample(self, logits: np.ndarray, temperature: float, topp: float,
               rng: XorShiftRng) -> int:
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        if logits.shape != (self.args.vocab_size,):
            raise ValueError(f"logits must have shape ({self.args.vocab_size},), got "
                             f"{logits.shape}")
        state, tok = C.c_uint64(rng.state), C.c_int()
        self._check(self._lib.bl_sample(self._h, logits, temperature, topp, C.byref(state),
                                        C.byref(tok)))
        rng.state = state.value
        return tok.value

    def generate(self, prompt_ids: list[int], steps: int, temperature: float = 1.0,
                 topp: float = 0.9, seed: int | None = None, context_shift: bool = True,
                 n_keep: int = 1) -> Iterator[int]:
        """Streams tokens exactly as NumpyLlama.generate (the shared generate_loop: same
        sampler, same seed stream, same context shift past max_seq_len), but the loop runs in C
        (bl_context_generate): one call yields a chunk of tokens, sized to take about
        CHUNK_SECONDS, instead of two calls and a Python sampler step per token."""
        check_sampling(temperature, topp)
        steps, shift = check_generate_args(len(prompt_ids), steps, self.args.max_seq_len,
                                           context_shift, n_keep)
        rng = XorShiftRng(seed if seed is not None else random_seed())
        self.reset()
        if steps <= len(prompt_ids) - 1:
            return
        ctx, err = C.c_void_p(), C.create_string_buffer(1024)
        if self._lib.bl_context_open(self._h, n_keep, int(shift), C.byref(ctx), err,
                                     len(err)) != 0:
            raise ValueError(err.value.decode(errors="replace"))
        try:
            yield from self._generate_chunks(ctx, self._ids(prompt_ids),
                                             steps - len(prompt_ids) + 1, temperature, topp, rng)
        finally:
            self._lib.bl_context_close(ctx)

    CHUNK_SECONDS = 0.02   # streaming latency vs calls: ~0.5 ms per token needs 40 per call

    def _generate_chunks(self, ctx: C.c_void_p, feed: np.ndarray, remaining: int,
                         temperature: float, topp: float, rng: XorShiftRng) -> Iterator[int]:
        out, n_out, state, chunk = np.empty(1, np.int32), C.c_int(), C.c_uint64(rng.state), 1
        while remaining > 0:
            k = min(chunk, remaining)
            if out.size < k:
                out = np.empty(k, np.int32)
            t0 = time.perf_counter()
            rc = self._lib.bl_context_generate(ctx, feed, feed.size, k, temperature, topp,
                                               C.byref(state), out, C.byref(n_out))
            dt = time.perf_counter() - t0
            rng.state = state.value
            yield from out[:n_out.value].tolist()   # the tokens before an error come first
            if rc != 0:
                msg = self._lib.bl_context_error(ctx).decode(errors="replace")
                raise {3: ValueError, 6: NonFiniteError}.get(rc, CError)(msg)
            if n_out.value < k:   # BOS or EOS
                return
            remaining -= k
            feed = out[k - 1:k].copy()
            chunk = max(1, min(2 * chunk, int(self.CHUNK_SECONDS * k / max(dt, 1e-9))))

    def generate_native(self, prompt_ids: list[int], steps: int, temperature: float = 1.0,
                        topp: float = 0.9, seed: int = 1, context_shift: bool = True,
                        n_keep: int = 1) -> list[int]:
        """The whole loop inside C (bl_generate, run.c's), tokens collected through a callback.
        The arguments are checked as generate's (bl_generate clamps and shifts by the same rule)."""
        check_sampling(temperature, topp)
        check_generate_args(len(prompt_ids), steps, self.args.max_seq_len, context_shift, n_keep)
        out: list[int] = []
        cb = TOKEN_CB(lambda t, _: out.append(t) or 0)
        ids = self._ids(prompt_ids)
        n = C.c_int()
        self._check(self._lib.bl_generate(self._h, ids, ids.size, steps, temperature, topp,
                                          seed, n_keep if context_shift else 0, cb, None,
                                          C.byref(n)))
        return out


class CTokenizer:
    """The C encoder/decoder over tokenizer.bin (the same results as babyllama.tokenizer)."""

    def __init__(self, path: str | Path, vocab_size: int = 0):
        self._lib = load_library()
        self._h = _open("bl_tokenizer_open", path, vocab_size)

    def __del__(self):
        if getattr(self, "_h", None):
            self._lib.bl_tokenizer_close(self._h)
            self._h = None

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        data = text.encode("utf-8")
        if b"\0" in data:
            raise ValueError("the C tokenizer takes NUL-terminated text: remove NUL characters")
        buf = np.zeros(4 * len(data) + 3, dtype=np.int32)
        n = C.c_int()
        rc = self._lib.bl_encode(self._h, data, int(bos), int(eos), buf, len(buf), C.byref(n))
        if rc != 0:
            raise CError(self._lib.bl_tokenizer_error(self._h).decode(errors="replace"))
        return buf[: n.value].tolist()

    def decode_piece(self, prev: int, token: int) -> bytes:
        p, n = C.c_void_p(), C.c_size_t()
        if self._lib.bl_decode(self._h, prev, token, C.byref(p), C.byref(n)) != 0:
            raise ValueError(f"token id {token} outside the vocabulary")
        return C.string_at(p, n.value) if n.value else b""
