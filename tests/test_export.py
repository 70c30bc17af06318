"""Chapter 04: llama2.c's file formats, checked against layouts computed by hand."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from babyllama.export import ModelFileError, dequantized, read_model, write_model
from babyllama.model import ModelArgs, Transformer

ARGS = {
    "tied": ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=37, max_seq_len=16,
                      hidden_dim=48),
    "mha": ModelArgs(dim=48, n_layers=3, n_heads=6, vocab_size=29, max_seq_len=8, hidden_dim=80),
}


def _model(args: ModelArgs, tied: bool = True, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(args).eval()
    if not tied:
        m.output.weight = torch.nn.Parameter(torch.randn(args.vocab_size, args.dim) * 0.02)
    return m


def _f32(t) -> bytes:
    return t.detach().float().contiguous().numpy().astype("<f4").tobytes()


def reference_v0(m: Transformer) -> bytes:
    """llama2.c's legacy layout, written out from the published description."""
    a, L = m.params, m.layers
    shared = m.shared_classifier
    out = struct.pack("<7i", a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads,
                      a.vocab_size if shared else -a.vocab_size, a.max_seq_len)
    out += _f32(m.tok_embeddings.weight)
    for get in (lambda l: l.attention_norm.weight, lambda l: l.attention.wq.weight,
                lambda l: l.attention.wk.weight, lambda l: l.attention.wv.weight,
                lambda l: l.attention.wo.weight, lambda l: l.ffn_norm.weight,
                lambda l: l.feed_forward.w1.weight, lambda l: l.feed_forward.w2.weight,
                lambda l: l.feed_forward.w3.weight):
        out += b"".join(_f32(get(l)) for l in L)
    out += _f32(m.norm.weight)
    out += b"\0" * (2 * 4 * a.max_seq_len * (a.head_dim // 2))   # RoPE tables (checked apart)
    if not shared:
        out += _f32(m.output.weight)
    return out


def reference_v1(m: Transformer) -> bytes:
    a, L = m.params, m.layers
    head = struct.pack("<Ii7iB", 0x616B3432, 1, a.dim, a.hidden_dim, a.n_layers, a.n_heads,
                       a.n_kv_heads, a.vocab_size, a.max_seq_len, int(m.shared_classifier))
    out = head + b"\0" * (256 - len(head))
    out += b"".join(_f32(l.attention_norm.weight) for l in L)
    out += b"".join(_f32(l.ffn_norm.weight) for l in L)
    out += _f32(m.norm.weight) + _f32(m.tok_embeddings.weight)
    for get in (lambda l: l.attention.wq, lambda l: l.attention.wk, lambda l: l.attention.wv,
                lambda l: l.attention.wo, lambda l: l.feed_forward.w1,
                lambda l: l.feed_forward.w2, lambda l: l.feed_forward.w3):
        out += b"".join(_f32(get(l).weight) for l in L)
    if not m.shared_classifier:
        out += _f32(m.output.weight)
    return out


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("name", ARGS)
def test_v0_bytes_match_the_published_layout(tmp_path, name, tied):
    m = _model(ARGS[name], tied)
    raw = write_model(m, tmp_path / "m.bin", version=0).read_bytes()
    ref = reference_v0(m)
    a = m.params
    rope = 2 * 4 * a.max_seq_len * (a.head_dim // 2)
    rope_at = len(ref) - rope - (0 if tied else 4 * a.vocab_size * a.dim)
    assert len(raw) == len(ref)
    assert raw[:rope_at] == ref[:rope_at] and raw[rope_at + rope:] == ref[rope_at + rope:]
    cos = np.frombuffer(raw[rope_at:rope_at + rope // 2], "<f4").reshape(a.max_seq_len, -1)
    assert np.allclose(cos, m.freqs_cos.numpy(), atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("name", ARGS)
def test_v1_bytes_match_the_published_layout(tmp_path, name, tied):
    m = _model(ARGS[name], tied)
    assert write_model(m, tmp_path / "m.bin", version=1).read_bytes() == reference_v1(m)


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("tied", [True, False])
def test_fp32_roundtrip_is_exact(tmp_path, version, tied):
    m = _model(ARGS["tied"], tied)
    args, w = read_model(write_model(m, tmp_path / "m.bin", version=version))
    assert args == m.params and w.shared_classifier == tied and w.version == version
    sd = m.state_dict()
    assert np.array_equal(w["tok_embeddings"], sd["tok_embeddings.weight"].numpy())
    assert np.array_equal(w["output"], sd["output.weight"].numpy())
    assert np.array_equal(w["norm"], sd["norm.weight"].numpy())
    for l in range(args.n_layers):
        for k, v in sd.items():
            if k.startswith(f"layers.{l}."):
                assert np.array_equal(w[f"layers.{l}.{k.split('.')[-2]}"], v.numpy()), k
    assert isinstance(w["tok_embeddings"].base, np.memmap) or w["tok_embeddings"].base is not None


def test_v2_layout_and_quantization_bound(tmp_path):
    m = _model(ARGS["tied"], tied=False)
    a = m.params
    raw = write_model(m, tmp_path / "q.bin", version=2, group_size=64).read_bytes()
    magic, version, *params = struct.unpack_from("<Ii7i", raw, 0)
    assert (magic, version, params) == (0x616B3432, 2, [32, 48, 2, 4, 2, 37, 16])
    assert raw[36] == 0 and struct.unpack_from("<i", raw, 37)[0] == 16   # 64 -> 32 -> 16
    gs = 16
    off = 256 + 4 * (2 * a.n_layers * a.dim + a.dim)   # the fp32 norms come first
    w_emb = m.tok_embeddings.weight.detach().numpy().reshape(-1, gs)
    q = np.frombuffer(raw, np.int8, w_emb.size, off).reshape(-1, gs)
    s = np.frombuffer(raw, "<f4", w_emb.size // gs, off + w_emb.size)
    assert np.allclose(s, np.abs(w_emb).max(1) / 127, rtol=1e-6)
    assert np.array_equal(q, np.round(w_emb / s[:, None]).astype(np.int8))
    report: dict[str, float] = {}
    write_model(m, tmp_path / "q2.bin", version=2, report=report)
    assert len(report) == 1 + 7 * a.n_layers + 1 and max(report.values()) < 1e-3
    _, w = read_model(tmp_path / "q.bin")
    deq = dequantized(w)
    assert report["layers.1.w2"] == np.abs(deq["layers.1.w2"] -
                                           m.state_dict()["layers.1.feed_forward.w2.weight"]
                                           .numpy()).max()
    for k, v in m.state_dict().items():
        name = "layers." + k.split(".")[1] + "." + k.split(".")[-2] if k.startswith("layers") \
            else k.removesuffix(".weight")
        t = v.numpy()
        if t.ndim == 2:   # error <= half a step of its group's scale
            step = np.abs(t.reshape(-1, gs)).max(1, keepdims=True) / 127
            assert (np.abs(deq[name].reshape(-1, gs) - t.reshape(-1, gs)) <= step / 2 + 1e-7).all()
        else:
            assert np.array_equal(deq[name], t)


def test_v2_all_zero_group(tmp_path):
    m = _model(ARGS["tied"])
    with torch.no_grad():
        m.layers[0].attention.wq.weight[0].zero_()
    _, w = read_model(write_model(m, tmp_path / "z.bin", version=2))
    assert (w["layers.0.wq"][0] == 0).all() and np.isfinite(dequantized(w)["layers.0.wq"]).all()


# ----------------------------------------------------------------------------------------------
# bad files

@pytest.fixture
def files(tmp_path):
    m = _model(ARGS["tied"])
    return {v: write_model(m, tmp_path / f"v{v}.bin", version=v) for v in (0, 1, 2)}


@pytest.mark.parametrize("version", [0, 1, 2])
def test_truncated(files, tmp_path, version):
    raw = files[version].read_bytes()
    for cut in (10, 100, len(raw) - 1):
        p = tmp_path / "cut.bin"
        p.write_bytes(raw[:cut])
        with pytest.raises(ModelFileError, match=r"truncated|expected|bytes"):
            read_model(p)


def test_wrong_magic_version_and_sizes(files, tmp_path):
    raw = bytearray(files[1].read_bytes())
    p = tmp_path / "bad.bin"
    bad = raw.copy()
    bad[4:8] = struct.pack("<i", 7)
    p.write_bytes(bad)
    with pytest.raises(ModelFileError, match="offset 4: unsupported version 7"):
        read_model(p)
    bad = raw.copy()
    bad[0:4] = b"XXXX"   # no magic: read as v0, whose numbers make no sense
    p.write_bytes(bad)
    with pytest.raises(ModelFileError, match="not a plausible value"):
        read_model(p)
    bad = raw.copy()
    bad[8:12] = struct.pack("<i", 64)   # dim 64: the file is too short for it
    p.write_bytes(bad)
    with pytest.raises(ModelFileError, match=r"describes a \d+-byte file .* but the file has"):
        read_model(p)
    p.write_bytes(bytes(raw) + b"\0" * 4)
    with pytest.raises(ModelFileError, match="the file has"):
        read_model(p)


def test_bad_group_size(files, tmp_path):
    raw = bytearray(files[2].read_bytes())
    raw[37:41] = struct.pack("<i", 5)
    (tmp_path / "g.bin").write_bytes(raw)
    with pytest.raises(ModelFileError, match="offset 37: group size 5 does not divide dim 32"):
        read_model(tmp_path / "g.bin")


def test_no_partial_output_file(tmp_path):
    m = _model(ARGS["tied"])
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")
    a, w, shared = m.params, {"tok_embeddings": np.zeros((1, 1), np.float32)}, True
    with pytest.raises(KeyError):
        write_model((a, w, shared), target, version=1)
    assert target.read_bytes() == b"previous"
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="unsupported llama2.c format version 3"):
        write_model(m, target, version=3)


def test_read_model_does_not_import_torch(files):
    import subprocess
    import sys

    code = ("import sys; from babyllama.export import read_model; "
            f"read_model({str(files[2])!r}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
