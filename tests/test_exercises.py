"""Solutions to the exercises at the end of each chapter, checked.

Each test is one exercise: the worked answer in code, then assertions on the numbers a reader
should find. Chapters 01-03 here; later chapters' exercises follow the same pattern."""

from __future__ import annotations

import math
from pathlib import Path

import jupytext
import pytest
import torch
import torch.nn.functional as F

from babyllama.config import PRESETS, ModelArgs, count_params

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
