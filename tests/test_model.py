"""Chapter 02: the model's blocks, the KV cache, and Hugging Face / Meta checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import scaled_model

from babyllama.checkpoints import CheckpointError, permute_from_hf, permute_to_hf
from babyllama.model import PRESETS, ModelArgs, Transformer, count_params

SHAPES = {   # small random configs: multi-head, grouped-query, multi-query, untied-friendly
    "mha": ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=97, max_seq_len=48),
    "gqa": ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=97, max_seq_len=48),
    "mqa": ModelArgs(dim=48, n_layers=3, n_heads=6, n_kv_heads=1, vocab_size=61, max_seq_len=48,
                     hidden_dim=100),
}


def _model(args: ModelArgs, seed: int = 0, scale: float = 1.0) -> Transformer:
    return scaled_model(args, scale, seed)


def test_preset_parameter_counts():
    """Known sizes: llama2.c's stories260K/15M/42M/110M and Meta's 6.74B for Llama 2 7B."""
    assert PRESETS["stories260K"].hidden_dim == 172
    # by hand: embedding 512*64; per layer wq 64*64, wk/wv 32*64, wo 64*64, w1/w2/w3 172*64,
    # two norms of 64; 5 layers; the final norm
    per_layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 172 * 64 + 2 * 64
    assert count_params(PRESETS["stories260K"]) == 512 * 64 + 5 * per_layer + 64 == 260_032
    assert round(count_params(PRESETS["stories15M"]) / 1e6, 1) == 15.2
    assert round(count_params(PRESETS["stories42M"]) / 1e6, 1) == 41.7
    assert round(count_params(PRESETS["stories110M"]) / 1e6, 1) == 109.5
    assert round(count_params(PRESETS["llama2-7b"], shared_classifier=False) / 1e9, 2) == 6.74
    m = Transformer(PRESETS["stories260K"])
    assert sum(p.numel() for p in m.parameters()) == count_params(PRESETS["stories260K"])


@pytest.mark.parametrize("kw,msg", [
    (dict(dim=65, n_heads=4), "not divisible by n_heads"),
    (dict(dim=64, n_heads=4, n_kv_heads=3), "not a multiple of n_kv_heads"),
    (dict(dim=60, n_heads=4), "must be even"),
    (dict(dim=0, n_heads=4), "must be positive"),
])
def test_inconsistent_shapes_fail_at_construction(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ModelArgs(**kw)


def test_too_long_input():
    m = _model(SHAPES["mha"])
    with pytest.raises(ValueError, match="longer than max_seq_len 48"):
        m(torch.zeros(1, 49, dtype=torch.long))


@pytest.mark.parametrize("name", SHAPES)
def test_cached_equals_full_recomputation(name):
    m = _model(SHAPES[name], scale=3.0)
    x = torch.randint(0, m.params.vocab_size, (2, 40))
    full = m(x)[0]
    m.reset_cache()
    steps = [m(x[:, :7], start_pos=0, use_cache=True)[0]]   # a prompt, then one at a time
    for t in range(7, 40):
        steps.append(m(x[:, t:t + 1], start_pos=t, use_cache=True)[0])
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("name", SHAPES)
def test_sdpa_equals_explicit_attention(name):
    m = _model(SHAPES[name], scale=3.0)
    x = torch.randint(0, m.params.vocab_size, (2, 33))
    a = m(x)[0]
    m.set_sdpa(False)
    assert (m(x)[0] - a).abs().max() < 1e-5


def test_rmsnorm_and_rope_by_hand():
    from babyllama.model import RMSNorm, apply_rotary_emb, precompute_freqs_cis

    x = torch.randn(3, 8)
    n = RMSNorm(8, 1e-5)
    assert torch.allclose(n(x), x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5))
    cos, sin = precompute_freqs_cis(4, 5)
    q = torch.randn(1, 5, 1, 4)
    out = apply_rotary_emb(q, cos, sin)
    for pos in range(5):   # rotate pair (0,1) by pos, pair (2,3) by pos / 100
        for i, theta in ((0, pos * 1.0), (2, pos / 100.0)):
            c, s = torch.cos(torch.tensor(theta)), torch.sin(torch.tensor(theta))
            a, b = q[0, pos, 0, i], q[0, pos, 0, i + 1]
            assert torch.allclose(out[0, pos, 0, i:i + 2], torch.stack([a * c - b * s,
                                                                       a * s + b * c]), atol=1e-6)


def test_generate_stops_and_is_seeded():
    m = _model(SHAPES["gqa"], scale=4.0)
    a = m.generate([1, 5, 6], 30, temperature=1.0, top_p=0.9, seed=3)
    assert a == m.generate([1, 5, 6], 30, temperature=1.0, top_p=0.9, seed=3)
    assert 1 not in a and 2 not in a and len(a) <= 30
    greedy = m.generate([1, 5], 10, temperature=0.0)
    logits = m(torch.tensor([[1, 5]]))[0][0, -1]
    assert greedy[0] == int(logits.argmax()) or greedy == []


# ----------------------------------------------------------------------------------------------
# Hugging Face: transformers' LlamaForCausalLM is the independent implementation

@pytest.mark.parametrize("name", SHAPES)
def test_huggingface_loads_ours_and_we_load_theirs(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    m = _model(SHAPES[name], scale=2.0)
    m.save_pretrained(tmp_path / "ours")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    x = torch.randint(0, m.params.vocab_size, (2, 30))
    with torch.no_grad():
        assert (hf(x).logits - m(x)[0]).abs().max() < 1e-4
        cfg = transformers.LlamaConfig(
            vocab_size=83, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=SHAPES[name].n_heads // 4 or 1,
            max_position_embeddings=64, tie_word_embeddings=(name != "mqa"))
        torch.manual_seed(1)
        theirs = transformers.LlamaForCausalLM(cfg).eval()
        theirs.save_pretrained(tmp_path / "theirs")
        back = Transformer.from_pretrained(tmp_path / "theirs").eval()
        y = torch.randint(0, 83, (2, 30))
        assert (theirs(y).logits - back(y)[0]).abs().max() < 1e-4
        assert back.shared_classifier == (name != "mqa")


def test_rotary_permutation_roundtrip():
    w = torch.randn(32, 16)
    assert torch.equal(permute_from_hf(permute_to_hf(w, 4), 4), w)
    assert not torch.equal(permute_to_hf(w, 4), w)


def test_pytorch_model_bin_loads_weights_only(tmp_path):
    from safetensors.torch import load_file

    m = _model(SHAPES["gqa"])
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    x = torch.randint(0, 97, (1, 12))
    assert torch.equal(Transformer.from_pretrained(tmp_path)(x)[0], m(x)[0])


def test_meta_layout_with_two_shards(tmp_path):
    """Meta's consolidated.NN.pth split along the model-parallel dimension of each weight."""
    m = _model(SHAPES["mha"])
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["output.weight"] = sd["output.weight"] + 0.5   # untied, as in Meta's release
    shards = [{}, {}]
    for k, v in sd.items():
        dim = 1 if k.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")) else 0
        parts = v.chunk(2, dim=dim) if v.dim() == 2 else (v, v)
        shards[0][k], shards[1][k] = parts[0].clone(), parts[1].clone()
    for i, s in enumerate(shards):
        torch.save(s, tmp_path / f"consolidated.{i:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps(
        {"dim": 64, "n_layers": 2, "n_heads": 4, "norm_eps": 1e-5, "vocab_size": -1}))
    back = Transformer.from_pretrained(tmp_path)
    assert not back.shared_classifier
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_checkpoint_with_missing_and_mismatched_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    m = _model(SHAPES["mha"])
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.norm.weight"] = torch.ones(65)
    sd["model.extra.weight"] = torch.ones(3)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        Transformer.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing: layers.1.feed_forward.w3.weight" in msg
    assert "shape mismatch: norm.weight: expected (64,), found (65,)" in msg
    assert "unexpected: model.extra.weight" in msg


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "x.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="weights-only"):
        Transformer.from_pretrained(tmp_path / "x.pt")


@pytest.mark.parametrize("version", [0, 1, 2])
def test_from_pretrained_reads_llama2c_files(tmp_path, version):
    from babyllama.export import write_model

    m = _model(SHAPES["gqa"], scale=2.0)
    back = Transformer.from_pretrained(write_model(m, tmp_path / "m.bin", version=version))
    x = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        diff = (back(x)[0] - m(x)[0]).abs().max().item()
    assert diff == 0.0 if version < 2 else diff < 0.05
