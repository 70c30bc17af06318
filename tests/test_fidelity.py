"""Formats that never lie: what a file cannot carry is refused, or approximated knowingly."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import scaled_model

from babyllama.checkpoints import CheckpointError
from babyllama.export import approximation_error, write_model
from babyllama.model import ModelArgs, Transformer

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32,
                 hidden_dim=96)


def _model(**kw) -> Transformer:
    return scaled_model(ModelArgs(**{**ARGS.to_dict(), **kw}), 2.0)


@pytest.mark.parametrize("field,value,want", [("norm_eps", 1e-6, "1e-05"),
                                              ("rope_theta", 500000.0, "10000")])
@pytest.mark.parametrize("version", [0, 1, 2])
def test_refuses_what_llama2c_cannot_carry(tmp_path, field, value, want, version):
    m = _model(**{field: value})
    with pytest.raises(ValueError, match=rf"{field} = {value:g} but .* assumes {want}"):
        write_model(m, tmp_path / "m.bin", version=version)
    assert list(tmp_path.iterdir()) == []


def test_approximate_reports_the_engines_error(tmp_path, capsys):
    """The reported error is what the NumPy engine, reading the file, really differs by."""
    from babyllama.inference_numpy import NumpyLlama

    m = _model(norm_eps=1e-6, rope_theta=20000.0)
    path = write_model(m, tmp_path / "m.bin", version=0, approximate=True)
    printed = float(re.search(r"max \|delta logit\| on a probe sequence: (\S+)",
                              capsys.readouterr().out).group(1))
    assert printed == pytest.approx(approximation_error(m), rel=1e-3)
    tokens = [1, 5, 17, 3, 90, 44, 2, 8, 61, 33, 12, 70]
    engine = NumpyLlama.load(path)
    ours = np.stack([engine.forward(t, pos) for pos, t in enumerate(tokens)])
    with torch.no_grad():
        truth = m(torch.tensor([tokens]))[0][0].numpy()
    measured = np.abs(ours - truth).max()
    assert measured > 1e-3   # theta and eps both matter at this scale: a real difference
    assert approximation_error(m, tokens) == pytest.approx(measured, rel=0.02, abs=1e-4)


def test_exact_model_writes_without_a_word(tmp_path, capsys):
    write_model(_model(), tmp_path / "m.bin", version=1)
    assert capsys.readouterr().out == ""


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "babyllama", *args], capture_output=True,
                          text=True)


def test_cli_export_from_hugging_face_defaults(tmp_path):
    """transformers' LlamaConfig defaults to rms_norm_eps = 1e-6: run.c would differ."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    assert cfg.rms_norm_eps == 1e-6
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    r = _cli("export", str(tmp_path / "hf"), str(tmp_path / "m.bin"))
    assert r.returncode == 1 and "norm_eps = 1e-06" in r.stderr and "--approximate" in r.stderr
    assert not (tmp_path / "m.bin").exists()
    r = _cli("export", str(tmp_path / "hf"), str(tmp_path / "m.bin"), "--approximate")
    assert r.returncode == 0, r.stderr
    assert "max |delta logit|" in r.stdout and (tmp_path / "m.bin").exists()


# ----------------------------------------------------------------------------------------------
# import: what our model cannot represent is refused, never silently dropped

@pytest.fixture
def hf_dir(tmp_path):
    _model().save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,msg", [
    (dict(attention_bias=True), "attention_bias = true"),
    (dict(mlp_bias=True), "mlp_bias = true"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(model_type="mistral"), "model_type 'mistral'"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}), "rope_type 'llama3'"),
    (dict(head_dim=32), "head_dim 32"),
])
def test_hf_config_we_cannot_represent(hf_dir, changes, msg):
    _edit_config(hf_dir, **changes)
    with pytest.raises(CheckpointError, match=re.escape(msg)):
        Transformer.from_pretrained(hf_dir)


def test_hf_bias_tensor_and_tie_mismatch(hf_dir):
    from safetensors.torch import load_file, save_file

    f = hf_dir / "model.safetensors"
    sd = load_file(f)
    save_file({**sd, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, f)
    with pytest.raises(CheckpointError, match=r"q_proj.bias \(our linear layers have no"):
        Transformer.from_pretrained(hf_dir)
    save_file(sd, f)
    _edit_config(hf_dir, tie_word_embeddings=False)   # untied, but no lm_head.weight
    with pytest.raises(CheckpointError, match="not tied .* but there is no output.weight"):
        Transformer.from_pretrained(hf_dir)
    save_file({**sd, "lm_head.weight": sd["model.embed_tokens.weight"] + 1}, f)
    _edit_config(hf_dir, tie_word_embeddings=True)    # tied, but lm_head.weight differs
    with pytest.raises(CheckpointError, match="tied .* but output.weight differs"):
        Transformer.from_pretrained(hf_dir)
    _edit_config(hf_dir, tie_word_embeddings=False)   # consistent: untied, loads
    assert not Transformer.from_pretrained(hf_dir).shared_classifier


@pytest.mark.parametrize("extra,msg", [({"use_scaled_rope": True}, "use_scaled_rope"),
                                       ({"moe_args": {}}, "unknown field 'moe_args'")])
def test_meta_params_we_cannot_represent(tmp_path, extra, msg):
    m = _model()
    torch.save(m.state_dict(), tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps(
        {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-5, **extra}))
    with pytest.raises(CheckpointError, match=msg):
        Transformer.from_pretrained(tmp_path)
