"""Solutions to the exercises at the end of each chapter, checked.

Each test is one exercise: the worked answer in code, then assertions on the numbers a reader
should find, chapter by chapter (01-06)."""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import struct
import subprocess
from pathlib import Path

import jupytext
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import c_quantize, scaled_model

from babyllama.config import PRESETS, ModelArgs, count_params
from babyllama.export import choose_group_size, read_header, write_model
from babyllama.fast_c import CLlama
from babyllama.inference_numpy import NumpyLlama, XorShiftRng, quantize_rows, sample

ROOT = Path(__file__).resolve().parents[1]


def chapter_function(chapter: str, name: str):
    """The function `name` as the chapter defines it (its cell run on its own)."""
    for cell in jupytext.read(ROOT / "book" / chapter).cells:
        if cell.cell_type == "code" and f"def {name}(" in cell.source:
            src = cell.source[: cell.source.index("\n\n\n")] if "\n\n\n" in cell.source \
                else cell.source
            ns: dict = {}
            exec("import collections\nimport math\nimport torch\n" + src, ns)
            return ns[name]
    raise LookupError(f"{chapter} defines no {name}")


# ----------------------------------------------------------------------------------------------
# chapter 01: the tokenizer

def test_01_1_merges_by_hand():
    """"the" appears twice, but "at" appears three times (cat, sat, mat): it merges first.
    A word of n symbols needs n - 1 merges to become one: ▁the takes three."""
    bpe_train_toy = chapter_function("01_tokenizer.py", "bpe_train_toy")
    merges = bpe_train_toy("the cat sat on the mat", 4)
    assert merges[0] == ("a", "t")                        # 3 occurrences
    assert merges[1:4] == [("▁", "t"), ("▁t", "h"), ("▁th", "e")]   # ties: 2 each
    # after three merges ▁the is still two symbols; the fourth completes it
    assert "▁the" not in {a + b for a, b in merges[:3]} and merges[3][0] + merges[3][1] == "▁the"


def test_01_2_byte_fallback(data_dir):
    """ü is U+00FC, two bytes in UTF-8 (C3 BC); the corpus has no ü, so the encoder spells it
    as byte pieces, whose ids are 3 + the byte value."""
    from babyllama.tokenizer import Tokenizer

    tok = Tokenizer.from_bin(data_dir / "tok512.bin")
    ids = tok.encode("über", bos=False)
    assert "ü".encode() == b"\xc3\xbc"
    byte_ids = [i for i in ids if 3 <= i < 259]
    assert byte_ids == [3 + 0xC3, 3 + 0xBC]
    assert tok.decode(ids) == "über"


def test_01_3_cost_of_the_vocabulary(data_dir, tmp_path):
    """4x the pieces: about half the tokens, for 1,536 x dim more embedding parameters."""
    import sentencepiece as spm

    from babyllama import data as D
    from babyllama.tokenizer import train_tokenizer

    train, val = D.load_corpus("stories", data_dir)
    n = {}
    for v in (512, 2048):
        sp = spm.SentencePieceProcessor(model_file=str(train_tokenizer(train[:2000],
                                                                       tmp_path / f"t{v}", v)))
        n[v] = sum(len(ids) for ids in sp.encode(val))
    assert 1.6 < n[512] / n[2048] < 2.4, n
    book = PRESETS["book"]
    big = ModelArgs(**{**book.to_dict(), "vocab_size": 2048})
    assert count_params(big) - count_params(book) == (2048 - 512) * book.dim   # tied: one table


# ----------------------------------------------------------------------------------------------
# chapter 02: the model

def test_02_1_rotations_keep_lengths():
    from babyllama.model import apply_rotary_emb, precompute_freqs_cis

    cos, sin = precompute_freqs_cis(head_dim=16, end=64)
    x = torch.randn(2, 64, 3, 16, generator=torch.Generator().manual_seed(0))
    r = apply_rotary_emb(x, cos, sin)
    assert torch.allclose(r.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    # every pair separately, too: each is turned in its own plane
    pairs = lambda t: t.reshape(*t.shape[:-1], 8, 2).norm(dim=-1)   # noqa: E731
    assert torch.allclose(pairs(r), pairs(x), rtol=1e-5, atol=1e-6)
    # the rotation is not the identity (except at position 0)
    assert (r[:, 1:] - x[:, 1:]).abs().max() > 0.1 and torch.equal(r[:, 0], x[:, 0])


def test_02_2_softmax_without_the_scale():
    """Unscaled scores (std 8 at head_dim 64) make softmax nearly one-hot: entropy ~0.4 nats,
    against ~2.4 scaled and ln 16 = 2.77 for uniform weights."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2000, 64, generator=g), torch.randn(2000, 16, 64, generator=g)
    scores = (k @ q[:, :, None]).squeeze(-1)

    def entropy(p):
        return -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item()

    unscaled, scaled = entropy(F.softmax(scores, -1)), entropy(F.softmax(scores / 8, -1))
    assert unscaled < 0.6
    assert 2.0 < scaled < math.log(16)


def test_02_3_w2_or_w3():
    """The feed-forward output is linear in w2 and in w3: shrinking either at init shrinks what
    the block adds to the residual stream by the same factor."""
    from babyllama.model import Transformer

    args = ModelArgs(dim=128, n_layers=4, n_heads=4, vocab_size=64, max_seq_len=16)
    x = torch.randn(4096, args.dim, generator=torch.Generator().manual_seed(1))
    spread = {}
    for shrink in ("w3", "w2", None):
        torch.manual_seed(0)
        ff = Transformer(args).layers[0].feed_forward
        with torch.no_grad():
            for name in ("w1", "w2", "w3"):
                std = 0.02 / math.sqrt(2 * args.n_layers) if name == shrink else 0.02
                getattr(ff, name).weight.normal_(0.0, std)
            spread[shrink] = ff(x).std().item()
    assert spread["w3"] == pytest.approx(spread["w2"], rel=0.1)
    factor = 1 / math.sqrt(2 * args.n_layers)
    assert spread["w3"] / spread[None] == pytest.approx(factor, rel=0.1)


def test_02_4_kv_cache_size():
    """fp32, one key and one value per layer, position and KV channel."""
    def kv_bytes(a: ModelArgs, seq: int) -> int:
        return 2 * a.n_layers * seq * a.n_kv_heads * a.head_dim * 4

    assert kv_bytes(PRESETS["stories15M"], 256) == 3_538_944                 # 3.4 MiB
    llama = PRESETS["llama2-7b"]
    assert kv_bytes(llama, 4096) == 4 * 2**30                                # 4 GiB
    gqa = ModelArgs(**{**llama.to_dict(), "n_kv_heads": 8})
    assert kv_bytes(gqa, 4096) == 2**30                                      # 1 GiB
    # and the library allocates exactly that for a small model
    from babyllama.model import Transformer

    small = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=32, max_seq_len=32)
    m = Transformer(small)
    with torch.no_grad():
        m(torch.zeros(1, 1, dtype=torch.long), start_pos=0, use_cache=True)
    allocated = sum(t.numel() * t.element_size() for layer in m.layers
                    for t in (layer.attention.cache_k, layer.attention.cache_v))
    assert allocated == kv_bytes(small, small.max_seq_len)


# ----------------------------------------------------------------------------------------------
# chapter 03: training

def _small_model():
    from babyllama.model import Transformer

    torch.manual_seed(0)
    return Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=16))


def _book_cfg(**kw):
    from babyllama.train import TrainConfig

    return TrainConfig(preset="book", max_iters=150, warmup_iters=20, **kw)


def test_03_1_first_step_is_lr_for_every_weight():
    """Step 1: m_hat = g and v_hat = g^2, so the update is lr * g / (|g| + eps) = ±lr."""
    from babyllama.train import make_optimizer

    model = _small_model()
    before = [p.detach().clone() for p in model.parameters()]
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    model(tokens[:, :-1], tokens[:, 1:])[1].backward()
    cfg = _book_cfg(weight_decay=0.0, learning_rate=1e-3)
    grads = [p.grad.clone() for p in model.parameters()]
    make_optimizer(model, cfg).step()
    for p, b, g in zip(model.parameters(), before, grads, strict=True):
        moved = (p.detach() - b).abs()[g.abs() > 1e-5]
        assert moved.numel() > 0
        assert torch.allclose(moved, torch.full_like(moved, 1e-3), rtol=1e-3)


def test_03_2_decay_alone():
    """Zero gradients: m = v = 0, so only the decay acts; matrices shrink by (1 - lr * wd),
    norm weights (not decayed) do not move."""
    from babyllama.train import make_optimizer

    model = _small_model()
    cfg = _book_cfg()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    make_optimizer(model, cfg).step()
    shrink = 1 - cfg.learning_rate * cfg.weight_decay
    for n, p in model.named_parameters():
        want = before[n] * shrink if p.dim() >= 2 else before[n]
        assert torch.allclose(p.detach(), want, rtol=1e-6, atol=0), n


def test_03_3_where_the_schedule_crosses_the_middle():
    """cos(pi * progress) = 0 at progress 1/2: halfway between warmup and max_iters."""
    from babyllama.book import book_config
    from babyllama.train import get_lr

    class P:
        run_dir = data = Path("unused")

    cfg = book_config(P())
    mid = (cfg.learning_rate + cfg.min_lr) / 2
    first = next(it for it in range(cfg.warmup_iters, cfg.max_iters) if get_lr(it, cfg) < mid)
    halfway = cfg.warmup_iters + (cfg.max_iters - cfg.warmup_iters) / 2
    assert abs(first - halfway) <= 1, (first, halfway)


def test_03_4_units():
    """1 nat/token at 4 bytes/token: perplexity e, 1/(4 ln 2) = 0.36 bits per byte. At equal
    bits per byte, loss per token grows with the bytes a token carries: the 32,000-piece
    vocabulary (more bytes per token) has the larger loss per token."""
    loss, bytes_per_token = 1.0, 4.0
    assert math.exp(loss) == pytest.approx(2.718, abs=1e-3)
    bpb = loss / math.log(2) / bytes_per_token
    assert bpb == pytest.approx(0.3607, abs=1e-4)

    def loss_per_token(bits_per_byte, bpt):
        return bits_per_byte * math.log(2) * bpt

    assert loss_per_token(bpb, 2.0) < loss_per_token(bpb, 4.0)


TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=96,
                 max_seq_len=32)


def untied(model):
    model.output.weight = torch.nn.Parameter(model.tok_embeddings.weight.detach() * 0.5)
    return model


# ---------------------------------------------------------------------------------------------
# chapter 04

def read_v0_header(path: Path) -> tuple[dict, bool]:
    """Exercise 4.1: the seven int32 of a v0 header; a negative vocab_size = unshared."""
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    values = dict(zip(names, struct.unpack("<7i", Path(path).read_bytes()[:28])))
    shared = values["vocab_size"] > 0
    values["vocab_size"] = abs(values["vocab_size"])
    return values, shared


@pytest.mark.parametrize("shared", [True, False])
def test_ex4_1_read_v0_header(tmp_path, shared):
    model = scaled_model(TINY)
    if not shared:
        untied(model)
    path = write_model(model, tmp_path / "m.bin", version=0)
    values, is_shared = read_v0_header(path)
    args, version, lib_shared, _, _ = read_header(path)
    assert version == 0 and is_shared == lib_shared == shared
    assert values == {"dim": args.dim, "hidden_dim": args.hidden_dim, "n_layers": args.n_layers,
                      "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
                      "vocab_size": args.vocab_size, "seq_len": args.max_seq_len}


def v2_size(a: ModelArgs, shared: bool, gs: int) -> int:
    """Exercise 4.2: header + fp32 norms + (1 + 4/gs) bytes per matrix weight."""
    kv_dim = a.n_kv_heads * a.head_dim
    per_layer = a.dim * (2 * a.dim + 2 * kv_dim) + 3 * a.dim * a.hidden_dim
    matrix_weights = a.n_layers * per_layer + a.vocab_size * a.dim * (1 if shared else 2)
    norms = (2 * a.n_layers + 1) * a.dim
    return 256 + 4 * norms + matrix_weights + 4 * (matrix_weights // gs)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("hidden", [96, 100])   # group size 32, then 4
def test_ex4_2_v2_size(tmp_path, shared, hidden):
    a = ModelArgs(**{**TINY.to_dict(), "hidden_dim": hidden})
    model = scaled_model(a)
    if not shared:
        untied(model)
    path = write_model(model, tmp_path / "m.bin", version=2)
    gs = choose_group_size(a)
    assert gs == (32 if hidden == 96 else 4)
    assert path.stat().st_size == v2_size(a, shared, gs)


def quantize_asym(w: np.ndarray, gs: int) -> np.ndarray:
    """Exercise 4.3: uint8 with a per-group minimum and step; returns the dequantized values."""
    g = w.reshape(-1, gs).astype(np.float64)
    lo, hi = g.min(axis=1, keepdims=True), g.max(axis=1, keepdims=True)
    step = np.where(hi > lo, (hi - lo) / 255, 1.0)
    q = np.clip(np.round((g - lo) / step), 0, 255)
    return (q * step + lo).reshape(w.shape)


def test_ex4_3_asymmetric_halves_the_error_on_positive_groups():
    w = np.random.default_rng(0).uniform(0.0, 1.0, 32 * 4096)
    g = w.reshape(-1, 32)
    s = np.abs(g).max(axis=1, keepdims=True) / 127
    sym = np.abs(np.round(g / s) * s - g).mean()
    asym = np.abs(quantize_asym(w, 32) - w).mean()
    assert 0.4 < asym / sym < 0.6
    # the price: a second fp32 (the minimum) per group, 1 + 8/32 = 1.25 bytes per weight
    assert (32 + 8) / 32 == 1.25


def kv_cache_bytes(a: ModelArgs, bytes_per_value: int) -> int:
    return 2 * a.n_layers * a.n_kv_heads * a.head_dim * a.max_seq_len * bytes_per_value


def test_ex4_4_kv_cache_of_llama2_70b(tmp_path):
    # the formula, against the cache the NumPy engine really allocates (fp32)
    engine = NumpyLlama.load(write_model(scaled_model(TINY), tmp_path / "m.bin", version=0))
    assert kv_cache_bytes(TINY, 4) == engine.key_cache.nbytes + engine.value_cache.nbytes
    a70 = ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000,
                    hidden_dim=28672, max_seq_len=4096)
    assert kv_cache_bytes(a70, 2) == 1_342_177_280           # 1.34 GB with GQA
    mha = ModelArgs(**{**a70.to_dict(), "n_kv_heads": 64})
    assert kv_cache_bytes(mha, 2) == 8 * 1_342_177_280       # 10.7 GB without


# ---------------------------------------------------------------------------------------------
# chapter 05

def _probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = (logits / np.float32(temperature)).astype(np.float64)   # as the library: float32
    e = np.exp(z - z.max())                                      # divide, float64 softmax,
    return (e / e.sum()).astype(np.float32)                      # float32 probabilities


def _draw(probs: np.ndarray, coin: float) -> int:
    hit = np.nonzero(np.float32(coin) < np.cumsum(probs, dtype=np.float32))[0]
    return int(hit[0]) if hit.size else len(probs) - 1


def sample_topk(logits: np.ndarray, k: int, temperature: float, coin: float) -> int:
    """Exercise 5.1: softmax over the k largest logits (the rest get -inf), then draw."""
    keep = np.argsort(-logits, kind="stable")[:k]
    masked = np.full_like(logits, -np.inf)
    masked[keep] = logits[keep]
    return _draw(_probs(masked, temperature), coin)


def sample_minp(logits: np.ndarray, min_p: float, temperature: float, coin: float) -> int:
    """Exercise 5.2: keep tokens with p >= min_p * max p, renormalise, draw."""
    p = _probs(logits, temperature).astype(np.float64)
    p = np.where(p >= min_p * p.max(), p, 0.0)
    return _draw((p / p.sum()).astype(np.float32), coin)


def test_ex5_1_topk():
    g = np.random.default_rng(1)
    for seed in range(1, 60):
        logits = (g.standard_normal(200) * 3).astype(np.float32)
        coin = XorShiftRng(seed).f32()
        assert sample_topk(logits, 1, 1.0, coin) == int(np.argmax(logits))
        top5 = set(np.argsort(-logits)[:5].tolist())
        assert sample_topk(logits, 5, 1.0, coin) in top5
        # k = vocab_size: plain multinomial sampling, the library's draw from the same coin
        assert sample_topk(logits, 200, 0.8, coin) == sample(logits, 0.8, 1.0, XorShiftRng(seed))


def test_ex5_2_minp_never_draws_below_the_threshold():
    g = np.random.default_rng(2)
    for seed in range(1, 200):
        logits = (g.standard_normal(100) * 2).astype(np.float32)
        t = sample_minp(logits, 0.1, 1.0, XorShiftRng(seed).f32())
        p = _probs(logits, 1.0)
        assert p[t] >= 0.1 * p.max()


def test_ex5_3_perplexity_numpy_equals_pytorch(tmp_path):
    model = scaled_model(TINY, scale=4.0)
    engine = NumpyLlama.load(write_model(model, tmp_path / "m.bin", version=0))
    tokens = np.random.default_rng(3).integers(0, TINY.vocab_size, 20).tolist()
    logits = engine.forward_tokens(tokens[:-1], 0).astype(np.float64)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    nll = -logp[np.arange(len(tokens) - 1), tokens[1:]].mean()
    with torch.no_grad():
        ref = F.cross_entropy(model(torch.tensor([tokens[:-1]]))[0][0],
                              torch.tensor(tokens[1:])).item()
    assert abs(nll - ref) < 1e-4
    assert abs(np.exp(nll) - np.exp(ref)) < 1e-3 * np.exp(ref)


# ---------------------------------------------------------------------------------------------
# chapter 06

FOUR_ROWS_C = r"""
void matmul4(float *xout, const float *x, const float *w, int n, int d) {
    int i = 0;
    for (; i + 4 <= d; i += 4) {          /* four rows share each load of x[j] */
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (int j = 0; j < n; j++) {
            float xj = x[j];
            s0 += w[(i + 0) * n + j] * xj; s1 += w[(i + 1) * n + j] * xj;
            s2 += w[(i + 2) * n + j] * xj; s3 += w[(i + 3) * n + j] * xj;
        }
        xout[i] = s0; xout[i + 1] = s1; xout[i + 2] = s2; xout[i + 3] = s3;
    }
    for (; i < d; i++) {                  /* the last d % 4 rows, one at a time */
        float s = 0;
        for (int j = 0; j < n; j++) s += w[i * n + j] * x[j];
        xout[i] = s;
    }
}
"""


def test_ex6_1_four_rows_at_a_time(tmp_path):
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    (tmp_path / "m4.c").write_text(FOUR_ROWS_C)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", str(tmp_path / "m4.c"), "-o",
                    str(tmp_path / "m4.so")], check=True)
    lib = ctypes.CDLL(str(tmp_path / "m4.so"))
    f32p = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
    lib.matmul4.argtypes = [f32p, f32p, f32p, ctypes.c_int, ctypes.c_int]
    g = np.random.default_rng(4)
    for d in range(1, 10):                   # every remainder d % 4
        W = g.standard_normal((d, 37), dtype=np.float32)
        x = g.standard_normal(37, dtype=np.float32)
        out = np.zeros(d, dtype=np.float32)
        lib.matmul4(out, x, W, 37, d)
        np.testing.assert_allclose(out, W.astype(np.float64) @ x, rtol=1e-5, atol=1e-5)


def test_ex6_2_c_quantize_equals_numpy():
    g = np.random.default_rng(5)
    for gs in (4, 32):
        x = g.standard_normal(256).astype(np.float32)
        x[:gs] = 0.0                                 # an all-zero group: scale 0, values 0
        x[gs] = 127 * 0.5 / 127                      # ties away from zero show up here
        q, s = c_quantize(x, gs)
        q_ref, s_ref = quantize_rows(x, gs)
        assert np.array_equal(q, q_ref) and np.array_equal(s, s_ref)


def test_ex6_3_threads_do_not_change_the_logits(tmp_path):
    a = ModelArgs(dim=512, n_layers=2, n_heads=8, vocab_size=512, hidden_dim=1536, max_seq_len=32)
    # big enough that 2 threads really split a token: work_threads (csrc/model.h) runs anything
    # under 2**22 multiply-adds a token on one thread, whatever the engine was given
    per_token = a.n_layers * (4 * a.dim * a.dim + 3 * a.dim * a.hidden_dim) + a.vocab_size * a.dim
    assert per_token >= 1 << 22
    path = write_model(scaled_model(a, scale=3.0), tmp_path / "m.bin", version=0)
    one, two = CLlama.load(path, threads=1), CLlama.load(path, threads=2)
    for pos, t in enumerate([1, 7, 42, 9]):
        assert np.array_equal(one.forward(t, pos), two.forward(t, pos))   # bit for bit
    prompt = [1, *range(3, 60, 4)]                                          # prefill too
    one.reset()
    two.reset()
    assert np.array_equal(one.forward_tokens(prompt, 0), two.forward_tokens(prompt, 0))
