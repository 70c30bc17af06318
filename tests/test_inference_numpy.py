"""Chapter 05: the NumPy engine against PyTorch, run.c's sampler, the no-torch guarantee."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from babyllama.export import write_model
from babyllama.inference_numpy import NumpyLlama, XorShiftRng, sample, sample_topp
from babyllama.model import PRESETS, Transformer

SHAPES = ["book", "stories260K", "stories15M", "stories42M", "stories110M"]


@pytest.mark.parametrize("preset", SHAPES)
def test_logits_equal_pytorch_at_every_position(preset, tmp_path):
    torch.manual_seed(0)
    m = Transformer(PRESETS[preset]).eval()
    x = torch.randint(0, m.params.vocab_size, (1, 64))
    with torch.no_grad():
        ref = m(x)[0][0].numpy()
    engine = NumpyLlama.load(write_model(m, tmp_path / "m.bin", version=0))
    got = np.stack([engine.forward(int(t), pos) for pos, t in enumerate(x[0])])
    assert np.abs(got - ref).max() < 1e-5
    engine.reset()
    assert np.abs(engine.forward_tokens(x[0].tolist(), 0) - got).max() < 1e-5


def test_trained_model_parity_and_greedy_200(trained, tmp_path):
    m = Transformer.from_pretrained(trained).eval()
    path = write_model(m, tmp_path / "t.bin", version=1)
    engine = NumpyLlama.load(path)
    x = torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(x)[0][0].numpy()
    got = np.stack([engine.forward(int(t), pos) for pos, t in enumerate(x[0])])
    assert np.abs(got - ref).max() < 1e-5
    ours = list(NumpyLlama.load(path).generate([1], steps=200, temperature=0.0))
    theirs = m.generate([1], max_new_tokens=200, temperature=0.0)
    assert ours == theirs and len(ours) > 20


def test_greedy_200_tokens_random_weights(tmp_path):
    """Random weights scaled up so that greedy decoding wanders over the vocabulary."""
    torch.manual_seed(3)
    m = Transformer(PRESETS["stories260K"]).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3)
    engine = NumpyLlama.load(write_model(m, tmp_path / "m.bin", version=0))
    ours = list(engine.generate([1, 42], steps=202, temperature=0.0))
    theirs = m.generate([1, 42], max_new_tokens=200, temperature=0.0)
    assert ours == theirs and len(ours) == 200 and len(set(ours)) > 20


def test_v2_close_to_fp32(trained, tmp_path):
    m = Transformer.from_pretrained(trained)
    f = NumpyLlama.load(write_model(m, tmp_path / "f.bin", version=0))
    q = NumpyLlama.load(write_model(m, tmp_path / "q.bin", version=2))
    toks = [1, 400, 300, 259, 270]
    a, b = f.forward_tokens(toks, 0), q.forward_tokens(toks, 0)
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.8


# ----------------------------------------------------------------------------------------------
# the sampler

def test_xorshift_first_values_by_hand():
    """xorshift64* computed here with explicit 64-bit masking, step by step."""
    s = 42
    mask = (1 << 64) - 1
    s ^= s >> 12
    s ^= (s << 25) & mask
    s ^= s >> 27
    expect = ((s * 0x2545F4914F6CDD1D) & mask) >> 32
    rng = XorShiftRng(42)
    assert rng.u32() == expect
    assert 0.0 <= XorShiftRng(7).f32() < 1.0
    with pytest.raises(ValueError, match="seed"):
        XorShiftRng(0)


def test_topp_keeps_the_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32)
    # the nucleus for p = 0.7 is {0, 1} (0.5 + 0.3 > 0.7); coin scales over its mass 0.8
    assert sample_topp(probs, 0.7, 0.0) == 0
    assert sample_topp(probs, 0.7, 0.6) == 0      # 0.6 * 0.8 = 0.48 < 0.5
    assert sample_topp(probs, 0.7, 0.7) == 1      # 0.56 >= 0.5
    assert sample_topp(probs, 0.7, 0.999) == 1    # never token 2 or 3
    assert sample_topp(probs, 0.99, 0.999) == 3


def test_sample_distribution_matches_softmax():
    logits = np.array([2.0, 1.0, 0.0, -1.0], dtype=np.float32)
    rng = XorShiftRng(123)
    counts = np.bincount([sample(logits, 1.0, 1.0, rng) for _ in range(20000)], minlength=4)
    expect = np.exp(logits) / np.exp(logits).sum()
    assert np.abs(counts / 20000 - expect).max() < 0.015
    assert sample(logits, 0.0, 0.9, rng) == 0


# ----------------------------------------------------------------------------------------------
# bad input and policies

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    torch.manual_seed(0)
    m = Transformer(PRESETS["stories260K"])
    return NumpyLlama.load(write_model(m, tmp_path_factory.mktemp("s") / "m.bin"))


def test_bad_generation_arguments(small):
    with pytest.raises(ValueError, match="longer than the context"):
        list(small.generate([1] * 513, steps=600, context_shift=False))
    with pytest.raises(ValueError, match="temperature"):
        list(small.generate([1], 10, temperature=-0.1))
    for p in (0.0, 1.5):
        with pytest.raises(ValueError, match="topp"):
            list(small.generate([1], 10, topp=p))
    with pytest.raises(ValueError, match="token id 512 outside the vocabulary"):
        small.forward(512, 0)
    with pytest.raises(ValueError, match="outside the context"):
        small.forward(1, 512)


def test_steps_past_the_context_are_clamped(small):
    """run.c's policy without the context shift: steps > max_seq_len runs to the end of the
    context, not past it (tests/test_context_shift.py covers the shift)."""
    out = list(small.generate([1, 5], steps=10_000, temperature=0.0, context_shift=False))
    assert len(out) <= 512 - 1
    short = list(small.generate([1, 5], steps=10, temperature=0.0, context_shift=False))
    assert len(short) <= 9 and out[: len(short)] == short


def test_no_torch_on_the_numpy_path(tmp_path, small):
    code = ("import sys; from babyllama.inference_numpy import NumpyLlama; "
            "from babyllama.tokenizer import Tokenizer; "
            "import babyllama.fast_c; "
            "print([m for m in ('torch', 'sentencepiece') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
