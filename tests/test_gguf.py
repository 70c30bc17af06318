"""write_gguf: read back with gguf's own reader, every tensor and key checked against the model.

The expected names are llama.cpp's, written out here; Q8_0 blocks are decoded by hand."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import scaled_model

from babyllama.export import write_gguf
from babyllama.model import ModelArgs

gguf = pytest.importorskip("gguf")

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=48,
                 hidden_dim=96, norm_eps=1e-6, rope_theta=500000.0)
ODD = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=512, max_seq_len=16, hidden_dim=48)
LLAMA_CPP = {   # llama.cpp's llama: GGUF name of each of our tensors
    "tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
    "output.weight": "output.weight", "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight", "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight", "feed_forward.w3.weight": "ffn_up.weight",
}


def _gguf_name(ours: str) -> str:
    if ours.startswith("layers."):
        _, l, rest = ours.split(".", 2)
        return f"blk.{l}.{LLAMA_CPP[rest]}"
    return LLAMA_CPP[ours]


def _q8_0_decode(raw: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """(values, per-block scale) of Q8_0 bytes: blocks of fp16 scale d, then 32 int8."""
    blocks = raw.reshape(-1, 34)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)   # (n_blocks, 1)
    qs = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (qs * d).reshape(shape), np.repeat(d[:, 0], 32).reshape(shape)


def _model(args: ModelArgs, tied: bool):
    m = scaled_model(args, 2.0)
    if not tied:
        m.output.weight = torch.nn.Parameter(torch.randn(args.vocab_size, args.dim))
    return m


@pytest.fixture(scope="module")
def tok(data_dir):
    return data_dir / "tok512.model"


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("tied", [True, False])
def test_tensors_read_back(tmp_path, tok, dtype, tied):
    m = _model(ARGS, tied)
    path = write_gguf(m, tok, tmp_path / "m.gguf", dtype=dtype)
    r = gguf.GGUFReader(path)
    got = {t.name: t for t in r.tensors}
    sd = m.state_dict()
    if tied:
        del sd["output.weight"]   # llama.cpp uses token_embd when output is absent
    assert sorted(got) == sorted(_gguf_name(k) for k in sd)
    T = gguf.GGMLQuantizationType
    for k, v in sd.items():
        t, want = got[_gguf_name(k)], v.numpy()
        assert list(t.shape) == list(want.shape[::-1]), k   # GGUF lists ne0 (a row) first
        if want.ndim == 1 or dtype == "f32":
            assert t.tensor_type == T.F32 and np.array_equal(t.data, want), k
        elif dtype == "f16":
            assert t.tensor_type == T.F16 and np.array_equal(t.data, want.astype(np.float16)), k
        else:
            assert t.tensor_type == T.Q8_0, k
            deq, d = _q8_0_decode(np.asarray(t.data), want.shape)
            blocks = want.reshape(-1, 32)
            d_exact = np.repeat(np.abs(blocks).max(1) / 127, 32).reshape(want.shape)
            assert np.allclose(d, d_exact, rtol=1e-3), k          # scale = max|w|/127 (fp16)
            # half a step of the exact scale, plus the fp16 rounding of d times |q| <= 127
            bound = d_exact * 0.5 + 127 * np.abs(d - d_exact) + 1e-7
            assert (np.abs(deq - want) <= bound).all(), k


def _tricky_blocks() -> np.ndarray:
    """Rows of 32 values where a Q8_0 quantizer's rounding and zero handling show."""
    ties = np.arange(32, dtype=np.float32) - 15.5               # d = 1 exactly: x.5 everywhere
    ties[0] = 127.0
    return np.stack([np.zeros(32, np.float32),                  # an all-zero block: d = 0
                     ties, -ties,                               # halves: away from zero
                     np.full(32, 1e-30, np.float32),            # d underflows fp16 to 0
                     np.linspace(-8.3e6, 8.3e6, 32, dtype=np.float32),  # d near fp16's max
                     np.nextafter(ties, np.float32(0))])        # just below each half


@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (7, 4128), (300, 4096), (5, 2, 64)])
def test_our_q8_0_is_ggml_bit_for_bit(shape):
    """Our Q8_0 quantizer (used slab by slab, to bound memory) gives the bytes of gguf's."""
    from babyllama.export import _gguf_data, quantize_gguf_q8_0

    rng = np.random.default_rng(sum(shape))
    w = (rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 50.0], shape)).astype(np.float32)
    flat = w.reshape(-1, 32)
    flat[:6] = _tricky_blocks()[:len(flat[:6])]
    want = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    got = quantize_gguf_q8_0(w)
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.array_equal(got, want)
    if len(shape) == 2:   # in slabs of a few rows, as write_gguf writes it
        assert np.array_equal(_gguf_data(w, gguf.GGMLQuantizationType.Q8_0), want)


def test_metadata_and_vocabulary(tmp_path, tok):
    import sentencepiece as spm

    m = _model(ARGS, True)
    r = gguf.GGUFReader(write_gguf(m, tok, tmp_path / "m.gguf", dtype="q8_0"))
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "llama"
    assert (f["llama.context_length"], f["llama.embedding_length"], f["llama.block_count"],
            f["llama.feed_forward_length"], f["llama.attention.head_count"],
            f["llama.attention.head_count_kv"], f["llama.rope.dimension_count"]) == \
        (48, 64, 2, 96, 4, 2, 16)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-6)
    assert f["llama.rope.freq_base"] == 500000.0
    assert f["general.file_type"] == 7   # LLAMA_FTYPE_MOSTLY_Q8_0
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    assert f["tokenizer.ggml.model"] == "llama"
    assert f["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(512)]
    assert np.allclose(f["tokenizer.ggml.scores"], [sp.get_score(i) for i in range(512)])
    # sentencepiece's layout: <unk> (2 unknown), <s> </s> (3 control), 256 bytes (6), normal (1)
    assert f["tokenizer.ggml.token_type"] == [2, 3, 3] + [6] * 256 + [1] * (512 - 259)
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"],
            f["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert f["tokenizer.ggml.add_bos_token"] is True


def test_q8_0_rows_not_in_blocks_stay_f32(tmp_path, tok):
    m = _model(ODD, True)   # hidden_dim 48: w2's rows are not whole 32-value blocks
    r = gguf.GGUFReader(write_gguf(m, tok, tmp_path / "m.gguf", dtype="q8_0"))
    t = {t.name: t for t in r.tensors}
    assert t["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert np.array_equal(t["blk.0.ffn_down.weight"].data,
                          m.layers[0].feed_forward.w2.weight.detach().numpy())
    assert t["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


def test_wq_wk_in_llama_cpp_order(tmp_path, tok):
    """llama.cpp's converter turns HF's q_proj/k_proj back into Meta's interleaved order by
    reshaping rows to (heads, 2, head_dim/2) and swapping the middle axes; from a HF checkpoint
    we must land on the same bytes."""
    from babyllama.model import Transformer

    m = _model(ARGS, True)
    m.save_pretrained(tmp_path / "hf")
    from safetensors.numpy import load_file

    hf = load_file(tmp_path / "hf" / "model.safetensors")
    r = gguf.GGUFReader(write_gguf(Transformer.from_pretrained(tmp_path / "hf"), tok,
                                   tmp_path / "m.gguf"))
    t = {t.name: t.data for t in r.tensors}
    for proj, heads, ours in (("q_proj", 4, "attn_q"), ("k_proj", 2, "attn_k")):
        w = hf[f"model.layers.1.self_attn.{proj}.weight"]
        converted = w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2)
        assert np.array_equal(t[f"blk.1.{ours}.weight"], converted.reshape(w.shape))


def test_bad_input_leaves_nothing(tmp_path, tok):
    m = _model(ARGS, True)
    big = _model(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=600, max_seq_len=8), True)
    with pytest.raises(ValueError, match="512 pieces, but the model's vocab_size is 600"):
        write_gguf(big, tok, tmp_path / "v.gguf")
    with pytest.raises(ValueError, match="unsupported GGUF dtype 'q4'"):
        write_gguf(m, tok, tmp_path / "v.gguf", dtype="q4")
    (tmp_path / "file").write_bytes(b"")   # a file where a directory should be
    with pytest.raises(OSError, match="m.gguf: cannot write the GGUF file"):
        write_gguf(m, tok, tmp_path / "file" / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("dtype, big", [("f16", 7e4), ("q8_0", 8.4e6), ("q8_0", np.nan)])
def test_values_the_dtype_cannot_hold(tmp_path, tok, dtype, big):
    """fp16 overflows past 65504, and a Q8_0 block's fp16 scale max|x|/127 past 127 x 65504:
    refused by name rather than written as inf; so is a NaN."""
    m = _model(ARGS, True)
    with torch.no_grad():
        m.layers[1].attention.wk.weight[3, 5] = float(big)
    with pytest.raises(ValueError, match=r"layers.1.wk \(blk.1.attn_k.weight\): a value of "
                                         rf"magnitude {re.escape(f'{big:g}')} does not fit "
                                         rf"{dtype.upper()}"):
        write_gguf(m, tok, tmp_path / "m.gguf", dtype=dtype)
    assert list(tmp_path.iterdir()) == []
    write_gguf(m, tok, tmp_path / "m.gguf", dtype="f32")   # f32 holds it


def test_cli_export_gguf(tmp_path, tok):
    from babyllama.cli import main

    m = _model(ARGS, True)
    m.save_pretrained(tmp_path / "hf")
    out = tmp_path / "m.gguf"
    assert main(["export", str(tmp_path / "hf"), str(out)]) == 1   # no --tokenizer
    assert not out.exists()
    assert main(["export", str(tmp_path / "hf"), str(out), "--tokenizer", str(tok),
                 "--dtype", "f16"]) == 0
    t = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert np.array_equal(t["blk.1.ffn_up.weight"].data,
                          m.layers[1].feed_forward.w3.weight.detach().numpy().astype(np.float16))
