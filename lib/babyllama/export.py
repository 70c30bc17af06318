"""Chapter 04: llama2.c's model files, byte for byte, and back.

    from babyllama.export import write_model, read_model
    write_model(model, "out/model.bin", version=0)   # v0: what run.c reads
    write_model(model, "out/model_q80.bin", version=2)   # v2: int8 Q8_0, what runq.c reads
    args, w = read_model("out/model.bin")             # memory-mapped NumPy arrays, no torch

    write_gguf(model, "out/tok512.model", "out/model.gguf", dtype="q8_0")   # llama.cpp

    babyllama export out/ckpt.pt out/model.bin --version 0
    babyllama export out/ckpt.pt out/model.gguf --tokenizer out/tok512.model --dtype q8_0

llama2.c's files have no field for norm_eps or rope_theta (run.c assumes 1e-5 and 10000): a model
with other values is refused unless `approximate=True`, which reports the measured logit error.
GGUF carries both, and the vocabulary. Both writers take a Transformer or (args, weights,
shared) with a lazy `weights` mapping (babyllama.shards), written one tensor at a time.

The three layouts (all little-endian):
    v0  7 x int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
        vocab_size < 0 means an unshared classifier), then fp32: tok_embeddings, attention_norm,
        wq, wk, wv, wo, ffn_norm, w1, w2, w3, norm, two unused RoPE tables, [output]
    v1  256-byte header: uint32 magic "ak42", int32 version, the 7 params, uint8 shared flag,
        zero padding; then fp32: attention_norm, ffn_norm, norm, tok_embeddings, wq, wk, wv, wo,
        w1, w2, w3, [output]
    v2  as v1 with version 2 and an int32 group size after the flag; the norms in fp32, then for
        each matrix of each layer (v1's order): its int8 values, then one fp32 scale per group

`read_model` returns per-layer views named "layers.{l}.wq" etc. For v2 a matrix is int8 and its
scales sit beside it as "layers.{l}.wq.scale". This module imports torch only to write.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from babyllama.config import ModelArgs
from babyllama.files import read_regular_file

MAGIC = 0x616B3432   # "ak42" read as a little-endian uint32
HEADER_V1 = 256
LAYER_MATS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
MAX_DIM = 1 << 20    # sanity bound for header numbers before any arithmetic


class ModelFileError(ValueError):
    pass


class Weights(dict):
    """name -> np.ndarray, plus what the file said about itself."""
    version: int = 0
    group_size: int = 0            # Q8_0 group size (v2), 0 otherwise
    shared_classifier: bool = True


def layer_shapes(a: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Shape of each per-layer tensor, as nn.Linear stores it: (out_features, in_features)."""
    kv_dim = a.n_kv_heads * a.head_dim
    return {"attention_norm": (a.dim,), "ffn_norm": (a.dim,),
            "wq": (a.dim, a.dim), "wk": (kv_dim, a.dim), "wv": (kv_dim, a.dim),
            "wo": (a.dim, a.dim), "w1": (a.hidden_dim, a.dim), "w2": (a.dim, a.hidden_dim),
            "w3": (a.hidden_dim, a.dim)}


def _tensor_order(version: int, n_layers: int, shared: bool) -> list[str]:
    """Names in file order. In v2 each matrix is written layer by layer (int8 then scales)."""
    per = lambda name: [f"layers.{l}.{name}" for l in range(n_layers)]   # noqa: E731
    mats = [n for m in LAYER_MATS for n in per(m)]
    tail = [] if shared else ["output"]
    if version == 0:
        return (["tok_embeddings", *per("attention_norm"), *mats[:4 * n_layers],
                 *per("ffn_norm"), *mats[4 * n_layers:], "norm", "freq_cis_real",
                 "freq_cis_imag", *tail])
    return [*per("attention_norm"), *per("ffn_norm"), "norm", "tok_embeddings", *mats, *tail]


def _shape(name: str, a: ModelArgs) -> tuple[int, ...]:
    if name in ("tok_embeddings", "output"):
        return (a.vocab_size, a.dim)
    if name == "norm":
        return (a.dim,)
    if name.startswith("freq_cis"):
        return (a.max_seq_len, a.head_dim // 2)
    return layer_shapes(a)[name.rsplit(".", 1)[1]]


# ----------------------------------------------------------------------------------------------
# Q8_0: symmetric int8 in groups, scale = max|w| / 127

def choose_group_size(a: ModelArgs, group_size: int = 64) -> int:
    """Halve the group size until it divides both dim and hidden_dim (the lengths of the rows
    every matmul reduces over), so that no group straddles two rows."""
    while group_size > 1 and (a.dim % group_size or a.hidden_dim % group_size):
        group_size //= 2
    return group_size


def quantize_q80(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(int8 values, fp32 scales, max abs error). Rounds half to even, like llama2.c's export
    (torch.round); an all-zero group gets scale 0 and zeros rather than a division by zero."""
    w = np.asarray(w, dtype=np.float32).reshape(-1, group_size)
    scale = (np.abs(w).max(axis=1) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1.0), scale)
    # clipped: with a subnormal max|w| the rounded scale can be smaller than max|w|/127,
    # and w/scale past 127 would wrap around in int8 (or be -128, which readers refuse)
    q = np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8)
    err = float(np.abs(q.astype(np.float32) * scale[:, None] - w).max()) if w.size else 0.0
    return q.reshape(-1), scale, err


def dequantize_q80(q: np.ndarray, scale: np.ndarray, group_size: int) -> np.ndarray:
    shape = q.shape
    return (q.reshape(-1, group_size).astype(np.float32) * scale[:, None]).reshape(shape)


# ----------------------------------------------------------------------------------------------
# writing

def weights_from_torch(model) -> tuple[ModelArgs, dict[str, np.ndarray], bool]:
    """(args, our per-layer names -> fp32 arrays, shared classifier) of a Transformer."""
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    w = {"tok_embeddings": sd["tok_embeddings.weight"], "norm": sd["norm.weight"],
         "output": sd["output.weight"]}
    for k, v in sd.items():
        if k.startswith("layers."):
            _, l, *_, name, _ = k.split(".")   # layers.3.attention.wq.weight
            w[f"layers.{l}.{name}"] = v
    return model.params, w, bool(model.shared_classifier)


# ----------------------------------------------------------------------------------------------
# fidelity: what the llama2.c formats cannot say

LLAMA2C_ASSUMES = {"norm_eps": 1e-5, "rope_theta": 10000.0}   # run.c hard-codes both


def unrepresentable(a: ModelArgs) -> list[tuple[str, float, float]]:
    """(field, the model's value, the value llama2.c's readers assume) for each field that a
    v0/v1/v2 file has no room for and that differs from what run.c assumes."""
    return [(k, getattr(a, k), v) for k, v in LLAMA2C_ASSUMES.items() if getattr(a, k) != v]


def approximation_error(model, tokens: list[int] | None = None, probe_len: int = 64,
                        seed: int = 0) -> float:
    """max |logit difference| between `model` and the model a llama2.c file describes (the same
    weights with run.c's norm_eps and rope_theta), on `tokens` or a seeded random probe."""
    import dataclasses

    import torch

    from babyllama.model import Transformer

    carried = dataclasses.replace(model.params, **LLAMA2C_ASSUMES)
    as_read = Transformer(carried).eval()
    if not model.shared_classifier:
        as_read.output.weight = torch.nn.Parameter(model.output.weight.detach().clone())
    as_read.load_state_dict(model.state_dict())
    n = min(probe_len, model.params.max_seq_len)
    x = torch.tensor([tokens]) if tokens is not None else torch.randint(
        0, model.params.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        diff = (model(x)[0].float() - as_read(x)[0].float()).abs().max().item()
    model.train(was_training)
    return diff


def check_fidelity(model, approximate: bool = False) -> float | None:
    """Refuse (ValueError) a model a llama2.c file cannot describe exactly, unless `approximate`:
    then return the measured max |delta logit| of the file's model (None if nothing differs)."""
    a = model[0] if isinstance(model, tuple) else model.params
    bad = unrepresentable(a)
    if not bad:
        return None
    what = "; ".join(f"{k} = {v:g} but llama2.c's formats have no field for it and run.c assumes "
                     f"{want:g}" for k, v, want in bad)
    if not approximate:
        raise ValueError(f"cannot write this model exactly: {what}. Pass approximate=True "
                         f"(--approximate) to write it anyway, or export to GGUF, which "
                         f"carries both")
    if isinstance(model, tuple):
        raise ValueError(f"{what}: approximate=True needs the Transformer, to measure the error")
    err = approximation_error(model)
    print(f"approximate export: {what}; max |delta logit| on a probe sequence: {err:.3e}")
    return err


def write_model(model, path: str | Path, version: int = 0, group_size: int = 64,
                report: dict[str, float] | None = None, approximate: bool = False) -> Path:
    """Write a Transformer (or a tuple (args, weights, shared) of NumPy arrays) to `path`.

    The weights of a tuple may be any mapping that loads a tensor when asked for it (a lazy view
    of a sharded checkpoint): tensors are converted and written one at a time. A model whose
    norm_eps or rope_theta the format cannot carry is refused unless `approximate` (see
    `check_fidelity`). For v2, pass a dict as `report` to receive each matrix's maximum
    quantization error."""
    if version not in (0, 1, 2):
        raise ValueError(f"unsupported llama2.c format version {version}: expected 0, 1 or 2")
    check_fidelity(model, approximate)
    a, w, shared = model if isinstance(model, tuple) else weights_from_torch(model)
    if shared is None:
        shared = "output" not in w or np.array_equal(w["output"], w["tok_embeddings"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    params = (a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size,
              a.max_seq_len)
    try:
        with open(tmp, "wb") as f:
            if version == 0:
                vocab = a.vocab_size if shared else -a.vocab_size
                f.write(struct.pack("7i", *params[:5], vocab, params[6]))
            else:
                gs = choose_group_size(a, group_size) if version == 2 else 0
                head = struct.pack("Ii7iB", MAGIC, version, *params, int(shared))
                head += struct.pack("i", gs) if version == 2 else b""
                f.write(head.ljust(HEADER_V1, b"\0"))
            names = _tensor_order(version, a.n_layers, shared)
            rope = {}
            if version == 0 and "freq_cis_real" not in w:   # unused by run.c, kept for its
                from babyllama.model import precompute_freqs_cis

                # layout, computed as llama2.c's export computes them (torch, fp32)
                cos, sin = precompute_freqs_cis(a.head_dim, a.max_seq_len, a.rope_theta)
                rope = {"freq_cis_real": cos.numpy(), "freq_cis_imag": sin.numpy()}
            for name in names:
                arr = np.ascontiguousarray(rope[name] if name in rope else w[name],
                                           dtype=np.float32)
                if arr.shape != _shape(name, a):
                    raise ValueError(f"{name}: expected shape {_shape(name, a)}, got {arr.shape}")
                if version == 2 and arr.ndim == 2:   # whole rows at a time: bounded memory
                    scales, err = [], 0.0
                    rows = max(1, (1 << 22) // arr.shape[1])
                    for r in range(0, arr.shape[0], rows):
                        q, s, e = quantize_q80(arr[r:r + rows], gs)
                        f.write(q.tobytes())
                        scales.append(s)
                        err = max(err, e)
                    f.write(np.concatenate(scales).tobytes())
                    if report is not None:
                        report[name] = err
                else:
                    f.write(memoryview(arr).cast("B"))   # no copy: big tensors
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------------------------
# reading

def read_header(path: str | Path) -> tuple[ModelArgs, int, bool, int, int]:
    """(args, version, shared_classifier, group_size, header_size), checked against the file."""
    path = Path(path)
    size, head = read_regular_file(path, ModelFileError, "model file", n=HEADER_V1)
    if len(head) < 28:
        raise ModelFileError(f"{path}: truncated: {len(head)} bytes, a header needs at least 28")
    (magic,) = struct.unpack_from("I", head, 0)
    if magic == MAGIC:
        if len(head) < HEADER_V1:
            raise ModelFileError(f"{path}: truncated header: {len(head)} bytes, expected "
                                 f"{HEADER_V1}")
        (version,) = struct.unpack_from("i", head, 4)
        if version not in (1, 2):
            raise ModelFileError(f"{path}: offset 4: unsupported version {version}, expected 1 "
                                 f"or 2")
        params = struct.unpack_from("7i", head, 8)
        shared = head[36]
        if shared not in (0, 1):
            raise ModelFileError(f"{path}: offset 36: shared-classifier flag {shared}, expected "
                                 f"0 or 1")
        group_size = struct.unpack_from("i", head, 37)[0] if version == 2 else 0
        header_size = HEADER_V1
    else:
        version, header_size, group_size = 0, 28, 0
        params = struct.unpack_from("7i", head, 0)
        shared = params[5] > 0
        params = (*params[:5], abs(params[5]), params[6])
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
             "max_seq_len")
    off0 = 8 if version else 0
    for i, (n, v) in enumerate(zip(names, params, strict=True)):
        if not 0 < v <= MAX_DIM:
            hint = " (is this a llama2.c model file?)" if version == 0 else ""
            raise ModelFileError(f"{path}: offset {off0 + 4 * i}: {n} = {v} is not a plausible "
                                 f"value{hint}")
    try:
        args = ModelArgs(**dict(zip(names, params, strict=True)))
    except ValueError as e:
        raise ModelFileError(f"{path}: inconsistent header: {e}") from e
    if version == 2 and (group_size <= 0 or args.dim % group_size
                         or args.hidden_dim % group_size):
        raise ModelFileError(f"{path}: offset 37: group size {group_size} does not divide dim "
                             f"{args.dim} and hidden_dim {args.hidden_dim}")
    expected = header_size + _payload_size(args, version, bool(shared), group_size)
    if size != expected:
        raise ModelFileError(f"{path}: the header describes a {expected}-byte file "
                             f"(v{version}, {params}), but the file has {size} bytes"
                             + (" (truncated?)" if size < expected else ""))
    return args, version, bool(shared), group_size, header_size


def _nbytes(name: str, a: ModelArgs, version: int, gs: int) -> int:
    n = int(np.prod(_shape(name, a)))
    if version == 2 and len(_shape(name, a)) == 2:
        return n + 4 * (n // gs)   # int8 values + fp32 scales
    return 4 * n


def _payload_size(a: ModelArgs, version: int, shared: bool, gs: int) -> int:
    """Bytes after the header, by arithmetic: a header claiming 2^20 layers is refused without
    a loop over them (and Python's integers do not overflow, as C's size_t would)."""
    def mat(n: int) -> int:
        return n + 4 * (n // gs) if version == 2 else 4 * n
    kv_dim = a.n_kv_heads * a.head_dim
    per_layer = (2 * 4 * a.dim + 2 * mat(a.dim * a.dim) + 2 * mat(kv_dim * a.dim)
                 + 3 * mat(a.hidden_dim * a.dim))                   # norms, wq wo, wk wv, w1-3
    emb = mat(a.vocab_size * a.dim) * (1 if shared else 2)          # tok_embeddings, [output]
    rope = 2 * 4 * a.max_seq_len * (a.head_dim // 2) if version == 0 else 0
    return a.n_layers * per_layer + 4 * a.dim + emb + rope          # ... and the final norm


def read_model(path: str | Path) -> tuple[ModelArgs, Weights]:
    """(ModelArgs, Weights) of a v0/v1/v2 file; the arrays are read-only views of a memmap."""
    args, version, shared, gs, off = read_header(path)
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    w = Weights()
    w.version, w.group_size, w.shared_classifier = version, gs, shared
    for name in _tensor_order(version, args.n_layers, shared):
        shape = _shape(name, args)
        n = int(np.prod(shape))
        if version == 2 and len(shape) == 2:
            w[name] = _int8_values(buf[off:off + n], off, name, path).reshape(shape)
            w[name + ".scale"] = _finite_scales(buf[off + n:off + n + 4 * (n // gs)], off + n,
                                                name, path)
        else:
            w[name] = buf[off:off + 4 * n].view(np.float32).reshape(shape)
        off += _nbytes(name, args, version, gs)
    if shared:
        w["output"] = w["tok_embeddings"]
        if version == 2:
            w["output.scale"] = w["tok_embeddings.scale"]
    w.pop("freq_cis_real", None)
    w.pop("freq_cis_imag", None)
    return args, w


def _int8_values(raw: np.ndarray, off: int, name: str, path: str | Path) -> np.ndarray:
    """The int8 values in `raw`, none of them -128, or an error naming the first: the writer
    quantizes to [-127, 127], and the C engine's SIMD sign trick negates int8 values, which
    -128 does not survive (the C loader refuses such a file with the same message)."""
    bad = raw == 0x80   # -128 as a byte
    if bad.any():
        raise ModelFileError(f"{path}: offset {off + int(bad.argmax())}: {name} holds the int8 "
                             f"value -128, outside the quantized range [-127, 127]")
    return raw.view(np.int8)


def _finite_scales(raw: np.ndarray, off: int, name: str, path: str | Path) -> np.ndarray:
    """The fp32 scales in `raw`, all finite, or an error naming the first that is not: a NaN
    scale would quantize to garbage, and the C engine refuses such a file too."""
    s = raw.view(np.float32)
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise ModelFileError(f"{path}: offset {off + 4 * int(bad[0])}: {name} has a scale that "
                             f"is not finite ({s[bad[0]]})")
    return s


def dequantized(w: Weights) -> dict[str, np.ndarray]:
    """fp32 copies of every tensor of a v2 file (v0/v1 tensors are returned as they are)."""
    out = {}
    for k, v in w.items():
        if k.endswith(".scale"):
            continue
        out[k] = dequantize_q80(v, w[k + ".scale"], w.group_size) if v.dtype == np.int8 else v
    return out


# ----------------------------------------------------------------------------------------------
# GGUF: llama.cpp's format, which carries everything (eps, theta, GQA, vocabulary) itself

GGUF_DTYPES = ("f32", "f16", "q8_0")
GGUF_TENSORS = {   # ours -> gguf's MODEL_TENSOR member (the names llama.cpp's llama reads)
    "tok_embeddings": "TOKEN_EMBD", "norm": "OUTPUT_NORM", "output": "OUTPUT",
    "attention_norm": "ATTN_NORM", "wq": "ATTN_Q", "wk": "ATTN_K", "wv": "ATTN_V",
    "wo": "ATTN_OUT", "ffn_norm": "FFN_NORM", "w1": "FFN_GATE", "w2": "FFN_DOWN", "w3": "FFN_UP",
}


def gguf_name(name: str) -> str:
    """Our name (layers.3.wq) -> GGUF's (blk.3.attn_q.weight)."""
    import gguf

    parts = name.split(".")
    bid = int(parts[1]) if parts[0] == "layers" else None
    tensor = gguf.MODEL_TENSOR[GGUF_TENSORS[parts[-1]]]
    return gguf.TENSOR_NAMES[tensor].format(bid=bid) + ".weight"


def _gguf_type(shape: tuple[int, ...], dtype: str):
    """The GGML type a tensor is stored as: norms stay f32; a q8_0 matrix whose rows are not a
    whole number of 32-value blocks stays f32 as well."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) == 1 or dtype == "f32":
        return T.F32
    if dtype == "f16":
        return T.F16
    return T.Q8_0 if shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0 else T.F32


FP16_MAX = 65504.0
GGUF_Q8_0_BLOCK = 32   # values per block; each block is an fp16 scale then 32 int8: 34 bytes


def quantize_gguf_q8_0(w: np.ndarray) -> np.ndarray:
    """GGML's Q8_0 of a matrix whose rows are whole 32-value blocks, as uint8 (rows, 34 per
    block). Per block, d = max|x| / 127 and q = x * (1/d) rounded half away from zero (C's
    roundf, as ggml's reference quantizer does; our v2 files round half to even instead),
    then d stored as fp16. Computed in fp32 throughout, like ggml, so the bytes are ggml's."""
    w = np.asarray(w, dtype=np.float32)
    x = w.reshape(-1, GGUF_Q8_0_BLOCK)
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)   # all-zero: q = 0
    v = x * inv
    q = np.trunc(v)
    q += np.sign(v) * (np.abs(v - q) >= 0.5)   # exact: no v + 0.5 that could round up
    out = np.empty((x.shape[0], 2 + GGUF_Q8_0_BLOCK), dtype=np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8)
    out[:, 2:] = q.astype(np.int8).view(np.uint8)
    return out.reshape(*w.shape[:-1], -1)


def _gguf_data(arr: np.ndarray, qtype) -> np.ndarray:
    """The bytes of one tensor as GGUF stores it. Q8_0 is quantized a slab of rows at a time
    into the output, so beyond the fp32 tensor itself this holds its 34/128-sized result and
    a few slab-sized temporaries (gguf's own quantizer holds the result twice, in pieces and
    joined)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return arr
    limit = FP16_MAX * (127 if qtype == T.Q8_0 else 1)   # Q8_0's scale max|x|/127 is fp16
    peak = max(float(arr.max()), -float(arr.min()))      # no |arr| temporary; NaN fails below
    if not peak <= limit:
        raise ValueError(f"a value of magnitude {peak:g} does not fit {qtype.name}, whose "
                         f"largest is {limit:g} (fp16's {FP16_MAX:g}"
                         + (" times 127)" if qtype == T.Q8_0 else ")") + ": write it as f32")
    if qtype == T.F16:
        return arr.astype(np.float16)
    out = np.empty((arr.shape[0], arr.shape[1] // GGUF_Q8_0_BLOCK * (2 + GGUF_Q8_0_BLOCK)),
                   dtype=np.uint8)
    rows = max(1, (1 << 14) // arr.shape[1])   # 64 KB of fp32: the temporaries stay in cache
    for r in range(0, arr.shape[0], rows):
        out[r:r + rows] = quantize_gguf_q8_0(arr[r:r + rows])
    return out


def _gguf_nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _gguf_vocab(writer, tokenizer_model_path: str | Path, vocab_size: int) -> None:
    import gguf

    from babyllama.tokenizer import load_sentencepiece

    sp = load_sentencepiece(tokenizer_model_path)
    if sp.vocab_size() != vocab_size:
        raise ValueError(f"{tokenizer_model_path}: {sp.vocab_size()} pieces, but the model's "
                         f"vocab_size is {vocab_size}")
    T = gguf.TokenType
    kinds = [T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else
             T.BYTE if sp.is_byte(i) else T.UNUSED if sp.is_unused(i) else T.NORMAL
             for i in range(vocab_size)]
    writer.add_tokenizer_model("llama")   # SentencePiece BPE with byte fallback
    writer.add_token_list([sp.id_to_piece(i) for i in range(vocab_size)])
    writer.add_token_scores([sp.get_score(i) for i in range(vocab_size)])
    writer.add_token_types([int(k) for k in kinds])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def write_gguf(model, tokenizer_model_path: str | Path, path: str | Path,
               dtype: str = "f32") -> Path:
    """Write a Transformer (or a tuple (args, weights, shared)) as a GGUF file for llama.cpp.

    wq and wk go in as they are: llama.cpp's llama rotates interleaved pairs, as Meta's code
    and ours do (its converter undoes Hugging Face's permutation). Tensors are converted and
    written one at a time, so with a lazy `weights` mapping the memory beyond the interpreter
    is one fp32 tensor plus its converted bytes (f16: half of it; q8_0: 34/128 of it, see
    `_gguf_data`). Checked in llama.cpp by bench/bench_gguf.py: f32 logits within 1e-5 of
    PyTorch's, greedy ids identical."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"unsupported GGUF dtype {dtype!r}: expected one of {GGUF_DTYPES}")
    a, w, shared = model if isinstance(model, tuple) else weights_from_torch(model)
    path = Path(path)
    names = ["tok_embeddings", *[f"layers.{l}.{m}" for l in range(a.n_layers) for m in
                                 ("attention_norm", *LAYER_MATS[:4], "ffn_norm", *LAYER_MATS[4:])],
             "norm", *([] if shared else ["output"])]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    tmp = path.with_name(path.name + ".tmp")
    writer = None
    try:
        writer = gguf.GGUFWriter(None, "llama")
        writer.add_name(path.stem)
        writer.add_context_length(a.max_seq_len)
        writer.add_embedding_length(a.dim)
        writer.add_block_count(a.n_layers)
        writer.add_feed_forward_length(a.hidden_dim)
        writer.add_head_count(a.n_heads)
        writer.add_head_count_kv(a.n_kv_heads)
        writer.add_rope_dimension_count(a.head_dim)
        writer.add_layer_norm_rms_eps(a.norm_eps)
        writer.add_rope_freq_base(a.rope_theta)
        writer.add_vocab_size(a.vocab_size)
        writer.add_file_type(int(file_type))
        if dtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _gguf_vocab(writer, tokenizer_model_path, a.vocab_size)
        types = {}
        for name in names:
            shape = _shape(name, a)
            types[name] = _gguf_type(shape, dtype)
            writer.add_tensor_info(gguf_name(name), shape, np.dtype(np.float32),
                                   _gguf_nbytes(shape, types[name]), raw_dtype=types[name])
        path.parent.mkdir(parents=True, exist_ok=True)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name in names:
            arr = np.ascontiguousarray(w[name], dtype=np.float32)
            if arr.shape != _shape(name, a):
                raise ValueError(f"{name}: expected shape {_shape(name, a)}, got {arr.shape}")
            try:
                data = _gguf_data(arr, types[name])
            except ValueError as e:
                raise ValueError(f"{name} ({gguf_name(name)}): {e}") from None
            del arr   # the fp32 copy, before the next tensor is read
            writer.write_tensor_data(data)
            del data
        writer.close()
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"{path}: cannot write the GGUF file ({e.strerror or e})") from e
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():   # what a failure left (after success it was renamed already)
            tmp.unlink()
    return path
