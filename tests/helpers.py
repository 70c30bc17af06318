"""Helpers the test modules share (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from babyllama import fast_c
from babyllama.model import ModelArgs, Transformer

CSRC = fast_c.CSRC
SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch on n threads inside the block, then as many as before (tiny test matrices: extra
    threads only wait on each other on a busy machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def scaled_model(args: ModelArgs, scale: float = 1.0, seed: int = 0) -> Transformer:
    """A random model in eval mode with every weight multiplied by `scale`: larger weights make
    sharper, more varied predictions than the 0.02-std initialisation."""
    torch.manual_seed(seed)
    m = Transformer(args).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    return m


def small_run(data_dir, out, **kw):
    """A TrainConfig for a short, quick stories260K run on the session's shards (64-token
    windows, every step logged, no progress bar); keyword arguments override any field."""
    from babyllama.train import TrainConfig

    base = dict(preset="stories260K", out_dir=str(out), data_dir=str(data_dir), max_seq_len=64,
                batch_size=4, max_iters=20, lr_decay_iters=20, warmup_iters=3, eval_interval=0,
                eval_iters=2, log_interval=1, progress=False, dropout=0.1)
    base.update(kw)
    return TrainConfig(**base)


def logged_losses(out) -> list[float]:
    """The training loss of every logged step of the run in `out`."""
    from babyllama.train import read_log

    return [r["loss"] for r in read_log(Path(out) / "log.jsonl") if "loss" in r]


def checkpoint_weights(path) -> dict:
    return torch.load(path, weights_only=True)["model"]


# ----------------------------------------------------------------------------------------------
# the C side: the CLI, its sanitizer build, kernels called directly

def cc() -> str:
    """The C compiler the tests build with: $CC, else cc, else gcc."""
    return os.environ.get("CC") or shutil.which("cc") or "gcc"


def build_cli() -> Path:
    """csrc/run, the C CLI, built by its Makefile (nothing to do when it is up to date)."""
    subprocess.run(["make", "-s", "-C", str(CSRC), "run", f"CC={cc()}"], check=True,
                   capture_output=True)
    return CSRC / "run"


_sanitizer_cli: dict[str, Path | str] = {}   # the session's build, or why there is none


def sanitizer_cli(tmp_path_factory) -> Path:
    """The C CLI (run.c and the library's sources) built with AddressSanitizer and UBSan, once
    a session; skips the calling test when the compiler has no sanitizer runtime. Run it with
    SANITIZER_ENV and pass its stderr to assert_sanitizer_clean."""
    if not _sanitizer_cli:
        d = tmp_path_factory.mktemp("asan")
        probe = subprocess.run([cc(), "-fsanitize=address,undefined", "-x", "c", "-", "-o",
                                str(d / "probe")], input="int main(void){return 0;}",
                               text=True, capture_output=True)
        if probe.returncode != 0:
            _sanitizer_cli["skip"] = "this compiler has no AddressSanitizer/UBSan runtime"
        else:
            exe = d / "run-asan"
            srcs = [str(CSRC / f) for f in ("run.c", *fast_c.LIB_SOURCES)]
            subprocess.run([cc(), "-std=c11", "-O1", "-g", "-fsanitize=address,undefined",
                            "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", *srcs, "-o",
                            str(exe), "-lm"], check=True)
            _sanitizer_cli["exe"] = exe
    if "skip" in _sanitizer_cli:
        pytest.skip(str(_sanitizer_cli["skip"]))
    return Path(_sanitizer_cli["exe"])


def assert_sanitizer_clean(stderr: str) -> None:
    assert "Sanitizer" not in stderr and "runtime error" not in stderr, stderr


@functools.cache
def _bl_quantize():
    f = fast_c.load_library().bl_quantize   # void bl_quantize(int8_t *q, float *s, x, n, gs)
    f.argtypes = [np.ctypeslib.ndpointer(np.int8, flags="C_CONTIGUOUS"),
                  np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS"),
                  np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS"),
                  ctypes.c_int, ctypes.c_int]
    f.restype = None
    return f


def c_quantize(x: np.ndarray, gs: int) -> tuple[np.ndarray, np.ndarray]:
    """The C kernel's Q8_0 quantization of x (n,): (int8 values (n,), float32 scales (n/gs,))."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    assert x.size % gs == 0, f"{x.size} values are not whole groups of {gs}"
    q, s = np.zeros(x.size, np.int8), np.zeros(x.size // gs, np.float32)
    _bl_quantize()(q, s, x, x.size, gs)
    return q, s
