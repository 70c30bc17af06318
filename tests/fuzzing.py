"""Bad files for the reliability and fuzz tests: tiny valid models and tokenizers, crafted
headers, and seeded mutations of both. NumPy only (no torch), so it is cheap to import."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from babyllama.config import ModelArgs
from babyllama.export import write_model

TINY = ModelArgs(dim=8, hidden_dim=16, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=12,
                 max_seq_len=8)
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
HEADER_VALUES = (0, -1, INT32_MIN, INT32_MAX, 1 << 20, (1 << 20) + 1, 1, 2, 3, 7)


def tiny_weights(a: ModelArgs = TINY, seed: int = 0, scale: float = 0.5) -> dict:
    """Random fp32 weights under our per-layer names, for write_model((args, w, shared))."""
    rng = np.random.default_rng(seed)
    kv = a.n_kv_heads * a.head_dim

    def r(*shape):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {"tok_embeddings": r(a.vocab_size, a.dim), "output": r(a.vocab_size, a.dim),
         "norm": 1 + r(a.dim)}
    for l in range(a.n_layers):
        p = f"layers.{l}."
        w |= {p + "attention_norm": 1 + r(a.dim), p + "ffn_norm": 1 + r(a.dim),
              p + "wq": r(a.dim, a.dim), p + "wk": r(kv, a.dim), p + "wv": r(kv, a.dim),
              p + "wo": r(a.dim, a.dim), p + "w1": r(a.hidden_dim, a.dim),
              p + "w2": r(a.dim, a.hidden_dim), p + "w3": r(a.hidden_dim, a.dim)}
    return w


def write_tiny(path: Path, version: int, shared: bool = True, a: ModelArgs = TINY,
               group_size: int = 4, **changes: np.ndarray) -> Path:
    w = tiny_weights(a) | changes
    return write_model((a, w, shared), path, version=version, group_size=group_size)


# ----------------------------------------------------------------------------------------------
# headers whose payload size overflows 64-bit arithmetic

def c_payload_size(version: int, p: tuple[int, ...], shared: bool, gs: int = 0) -> int:
    """The payload size as the C loader computed it before it checked for overflow: exact
    integers here, so `% 2**64` shows what size_t arithmetic wraps to."""
    dim, hid, L, nh, nkv, V, S = p
    hd = dim // nh
    kv = nkv * hd

    def mb(n):
        return n + 4 * (n // gs) if version == 2 else 4 * n

    norms = 4 * (2 * L * dim + dim)
    mats = L * (mb(dim * dim) * 2 + mb(kv * dim) * 2 + mb(hid * dim) * 3)
    emb = mb(V * dim) * (1 if shared else 2)
    rope = 2 * 4 * S * (hd // 2) if version == 0 else 0
    return norms + mats + emb + rope


# every field at most 2^20 (the plausibility bound), yet the payload is 2^64 + 8 bytes (v0)
# or exactly 2^64 (v1): dim = L = 2^20, head_dim 2, and 2 kv_dim + 3 hidden_dim chosen so the
# matrices cancel the norms modulo 2^64, then the vocabulary cancels what is left
OVERFLOW_PARAMS = (1 << 20, (1 << 19) - 1, 1 << 20, 1 << 19, 1 << 17, (1 << 20) - 1, 1)
# v2 with group size 1 (5 bytes a value): the same idea solved modulo 2^64 with 5 inverted
OVERFLOW_PARAMS_V2 = (1 << 20, 838860, 1 << 20, 1 << 19, 1 << 19, 838860, 1)


def overflow_file(path: Path, version: int, seq_len: int = 1) -> Path:
    """A header that passes every per-field check and whose size, computed modulo 2^64,
    equals the file's size (v0: 36 + 8 (seq_len - 1) bytes; v1, v2: 256 bytes)."""
    p = OVERFLOW_PARAMS_V2 if version == 2 else (*OVERFLOW_PARAMS[:6], seq_len)
    if version == 0:
        head = struct.pack("<7i", *p)
    else:
        head = struct.pack("<Ii7iBi", 0x616B3432, version, *p, 1, 1).ljust(256, b"\0")
    payload = c_payload_size(version, p, True, gs=1) % (1 << 64)
    assert payload < 1 << 20, "the crafted header no longer wraps around"
    path.write_bytes(head + b"\x01" * payload)
    return path


def many_layers_v0(path: Path) -> Path:
    """A 38 KB v0 file claiming 2^20 layers (everything else tiny)."""
    path.write_bytes(struct.pack("<7i", 8, 16, 1 << 20, 2, 1, 12, 8) + bytes(38_000))
    return path


# ----------------------------------------------------------------------------------------------
# mutations

def header_fields(version: int) -> list[tuple[int, str]]:
    """(offset, struct format) of each header field."""
    if version == 0:
        return [(4 * i, "<i") for i in range(7)]
    fields = [(4, "<i"), *((8 + 4 * i, "<i") for i in range(7)), (36, "<B")]
    return fields + ([(37, "<i")] if version == 2 else [])


def mutate_model(raw: bytes, version: int, rng: np.random.Generator) -> bytes:
    """One seeded mutation: a truncation, byte flips, a header field set to an extreme or
    random value, a non-dividing group size, or a NaN/inf float somewhere in the payload."""
    b = bytearray(raw)
    kind = rng.integers(0, 6)
    if kind == 0:   # truncation, often at a boundary
        cut = int(rng.choice([0, 3, 27, 28, 29, 255, 256, 257, len(b) - 1, len(b) - 4,
                              int(rng.integers(0, len(b)))]))
        return bytes(b[:max(cut, 0)])
    if kind == 1:   # random byte flips, anywhere or in the header
        span = len(b) if rng.random() < 0.5 else min(len(b), 260)
        for _ in range(int(rng.integers(1, 5))):
            b[int(rng.integers(0, span))] = int(rng.integers(0, 256))
        return bytes(b)
    if kind in (2, 3):   # a header field set to a chosen value
        off, fmt = header_fields(version)[int(rng.integers(0, len(header_fields(version))))]
        if fmt == "<B":
            b[off] = int(rng.choice([0, 1, 2, 255]))
        else:
            v = int(rng.choice(HEADER_VALUES)) if kind == 2 else int(rng.integers(-64, 65))
            b[off:off + 4] = struct.pack(fmt, v)
        return bytes(b)
    if kind == 4 and rng.random() < 0.5:   # several fields large at once: big size arithmetic
        for off, fmt in header_fields(version)[:9]:
            if fmt == "<i" and off != 4 and rng.random() < 0.6:
                big = int(rng.choice([1 << 20, (1 << 20) - 1, 1 << 19, 838860, 3 << 18]))
                b[off:off + 4] = struct.pack(fmt, big)
        return bytes(b)
    if kind == 4 and version == 2:   # a group size that does not divide (or is absurd)
        b[37:41] = struct.pack("<i", int(rng.choice([3, 5, 6, 7, 12, 16, 9, -4, 1 << 30])))
        return bytes(b)
    # a NaN or infinity written over an aligned float of the payload
    start = 28 if version == 0 else 256
    nfloats = (len(b) - start) // 4
    if nfloats > 0:
        i = start + 4 * int(rng.integers(0, nfloats))
        b[i:i + 4] = struct.pack("<f", float(rng.choice([np.nan, np.inf, -np.inf, 1e38])))
    return bytes(b)


def mutate_tokenizer(raw: bytes, rng: np.random.Generator, offsets: list[int]) -> bytes:
    """One seeded mutation of a tokenizer.bin; `offsets` are its record starts."""
    b = bytearray(raw)
    kind = rng.integers(0, 5)
    if kind == 0:   # cut anywhere
        return bytes(b[:int(rng.integers(0, len(b) + 1))])
    if kind == 1:   # cut exactly at a record boundary
        return bytes(b[:int(rng.choice(offsets))])
    if kind == 2:   # a length field or the header set to an extreme value
        off = int(rng.choice(offsets[:-1])) + 4 if rng.random() < 0.8 else 0
        b[off:off + 4] = struct.pack("<i", int(rng.choice(HEADER_VALUES + (-5, 40, 1 << 16))))
        return bytes(b)
    if kind == 3:   # a NaN or infinite score
        off = int(rng.choice(offsets[:-1]))
        b[off:off + 4] = struct.pack("<f", float(rng.choice([np.nan, np.inf, -np.inf])))
        return bytes(b)
    for _ in range(int(rng.integers(1, 5))):   # byte flips
        b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
    return bytes(b)


def record_offsets(raw: bytes) -> list[int]:
    """Start of every record of a valid tokenizer.bin, and its end."""
    offs, off = [], 4
    while off < len(raw):
        offs.append(off)
        off += 8 + struct.unpack_from("<i", raw, off + 4)[0]
    return offs + [off]


# ----------------------------------------------------------------------------------------------
# tokenizers: small valid files written by hand (no sentencepiece needed)

def tokenizer_bin(path: Path, byte_fallback: bool = True) -> Path:
    """A valid tokenizer.bin: <unk> <s> </s>, [<0x00>..<0xFF>], characters, then merges
    (each the concatenation of two earlier pieces, scored so that earlier merges win)."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"]
    if byte_fallback:
        pieces += [b"<0x%02X>" % i for i in range(256)]
    chars = [c.encode() for c in " abcemnOpstuiy,."] if byte_fallback else [b" ", b"a", b"b"]
    merges = ([b" a", b"on", b"ce", b"On", b"Once", b" u", b"up", b"upon", b" upon", b"ti",
               b"me", b"time", b" time", b" c", b"at", b" cat", b" s", b" sat", b"an", b" an"]
              if byte_fallback else [b"ab", b" a", b" ab", b"ba", b"abab", b"aa"])
    pieces += chars + merges
    scores = [0.0] * (len(pieces) - len(chars) - len(merges)) + [-100.0] * len(chars)
    scores += [-float(i) for i in range(len(merges))]
    out = struct.pack("<i", max(len(p) for p in pieces))
    for p, s in zip(pieces, scores, strict=True):
        out += struct.pack("<fi", s, len(p)) + p
    path.write_bytes(out)
    return path


# ----------------------------------------------------------------------------------------------
# the worker: `python tests/fuzzing.py models|tokenizers LIST` loads every file listed (one
# path a line; tokenizers: "path vocab_size") in both engines or both readers, in-process, and
# prints one JSON line per file. It prints "start PATH" before each file, so that a crash or a
# hang can be pinned on the file that caused it.

def _outcome(fn, path: str, allowed: tuple[type, ...], *args) -> tuple[str, bool, object]:
    """(what happened to fn(*args), does an error message name the file, the result)."""
    try:
        return "ok", True, fn(*args)
    except allowed as e:
        return type(e).__name__, path in str(e), None
    except Exception as e:   # noqa: BLE001 - reported to the test, which fails on it
        return f"UNEXPECTED {type(e).__name__}: {e}", False, None


def _use(engine) -> None:
    """A forward pass, then three samplers (two of them degenerate) on its logits."""
    from babyllama.inference_numpy import XorShiftRng

    logits = engine.forward(min(1, engine.args.vocab_size - 1), 0)
    for t, top in ((1.0, 0.9), (1e-40, 0.9), (float("inf"), 1e-4)):
        engine.sample(logits, t, top, XorShiftRng(7))


def _c_load(path: str):
    from babyllama.fast_c import CLlama

    return CLlama.load(path, threads=1)


def _model_worker(paths: list[str]) -> None:
    import json

    from babyllama.export import ModelFileError
    from babyllama.fast_c import CError
    from babyllama.inference_numpy import NonFiniteError, NumpyLlama

    for p in paths:
        print("start", p, flush=True)
        rec = {"path": p}
        for name, load, err in (("np", NumpyLlama.load, ModelFileError), ("c", _c_load, CError)):
            what, named, engine = _outcome(load, p, (err,), p)
            rec[name] = [what, named]
            if engine is not None:   # it loaded: a forward pass and three samplers run too
                rec[name].append(_outcome(_use, p, (NonFiniteError,), engine)[0])
                del engine
        print(json.dumps(rec), flush=True)


def _tokenizer_worker(lines: list[str]) -> None:
    import json

    from babyllama.fast_c import CError, CTokenizer
    from babyllama.tokenizer import Tokenizer, TokenizerError

    text = "Once upon a time, a cat 🐈 sat. ab aab"
    for line in lines:
        p, vocab = line.rsplit(" ", 1)
        print("start", p, flush=True)
        rec = {"path": p, "vocab": {}}
        for v in (None, int(vocab)):   # to the end of the file, and the size a model asks for
            py = _outcome(Tokenizer.from_bin, p, (TokenizerError,), p, v)
            c = _outcome(CTokenizer, p, (CError,), p, v or 0)
            r = rec["vocab"][str(v)] = {"py": list(py[:2]), "c": list(c[:2])}
            if py[2] is not None and c[2] is not None:   # both read it: the same ids and bytes
                ids = py[2].encode(text, bos=True, eos=True)
                r["same"] = (c[2].encode(text, bos=True, eos=True) == ids and all(
                    c[2].decode_piece(a, b) == py[2].piece_bytes(a, b)
                    for a in (1, 5) for b in range(py[2].vocab_size)))
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    import sys

    kind, listing = sys.argv[1], Path(sys.argv[2]).read_text().splitlines()
    (_model_worker if kind == "models" else _tokenizer_worker)(listing)
