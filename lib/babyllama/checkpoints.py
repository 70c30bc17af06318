"""Checkpoints users already have, for chapter 02's `Transformer.from_pretrained`/`save_pretrained`.

Three layouts, one set of names (ours, which are Meta's):
- ours: a training checkpoint `ckpt.pt` {"model_args", "model", ...} (or a directory holding one);
- Hugging Face: config.json + model.safetensors (or pytorch_model.bin), names model.layers.N...;
- Meta: params.json + consolidated.NN.pth, sharded across model-parallel ranks when NN > 00.

Every .pt/.pth/.bin is read with torch.load(weights_only=True): tensors only, never code.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from babyllama.model import ModelArgs, Transformer


class CheckpointError(ValueError):
    pass


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # pickle errors come in many types; report which file and why
        raise CheckpointError(f"{path}: cannot load as a weights-only torch checkpoint: {e}") from e


# ----------------------------------------------------------------------------------------------
# our training checkpoints carry a checksum: torch.load does not verify the archive's CRCs, so a
# flipped byte in a weight would otherwise load silently

def state_checksum(state: dict) -> str:
    """SHA-256 over every value in a checkpoint (but its "checksum"): tensors by their bytes,
    dtype and shape, everything else by its repr, each under its key path."""
    h = hashlib.sha256()

    def walk(key: str, v) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous().reshape(-1)
            h.update(f"{key}:{v.dtype}:{tuple(v.shape)}\n".encode())
            h.update(t.view(torch.uint8).numpy())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                if not (key == "" and k == "checksum"):
                    walk(f"{key}/{k}", v[k])
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(f"{key}/{i}", x)
        else:
            h.update(f"{key}={v!r}\n".encode())

    walk("", state)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> dict:
    """A training checkpoint (ckpt.pt), loaded weights-only and checked against its checksum."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    state = _torch_load(path)
    if not isinstance(state, dict) or "model" not in state or "model_args" not in state:
        raise CheckpointError(f"{path}: not a babyllama checkpoint (expected keys 'model' and "
                              f"'model_args')")
    if "checksum" in state:   # checkpoints written before checksums have none
        found = state_checksum(state)
        if state["checksum"] != found:
            raise CheckpointError(f"{path}: corrupt checkpoint: its checksum does not match its "
                                  f"contents (stored {str(state['checksum'])[:16]}..., computed "
                                  f"{found[:16]}...)")
    return state


# ----------------------------------------------------------------------------------------------
# Hugging Face <-> Meta: names and the rotary permutation of wq, wk

def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary pairs -> HF's rotate-half layout, per head, on the rows of w."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


HF_NAMES = {   # ours -> Hugging Face's, per layer
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}


def to_hf(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", k)
        if m:
            if m.group(2) == "attention.wq.weight":
                v = permute_to_hf(v, args.n_heads)
            elif m.group(2) == "attention.wk.weight":
                v = permute_to_hf(v, args.n_kv_heads)
            out[f"model.layers.{m.group(1)}.{HF_NAMES[m.group(2)]}"] = v
        else:
            out[HF_TOP[k]] = v
    return out


def from_hf(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    inv = {v: k for k, v in HF_NAMES.items()}
    inv_top = {v: k for k, v in HF_TOP.items()}
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", k)
        if m and m.group(2) in inv:
            name = inv[m.group(2)]
            if name == "attention.wq.weight":
                v = permute_from_hf(v, args.n_heads)
            elif name == "attention.wk.weight":
                v = permute_from_hf(v, args.n_kv_heads)
            out[f"layers.{m.group(1)}.{name}"] = v
        elif k in inv_top:
            out[inv_top[k]] = v
        elif not k.endswith("rotary_emb.inv_freq"):   # a buffer older transformers saved
            out[k] = v   # unknown: reported as unexpected by load_state
    return out


# ----------------------------------------------------------------------------------------------
# building a model from a state dict, with an error that lists every problem

def build(args: ModelArgs, sd: dict[str, torch.Tensor], source: Path,
          tied: bool | None = None) -> Transformer:
    model = Transformer(args)
    if tied is None:
        tied = "output.weight" not in sd or torch.equal(sd["output.weight"],
                                                        sd["tok_embeddings.weight"])
    if not tied:
        model.output.weight = nn.Parameter(model.tok_embeddings.weight.detach().clone())
    sd = dict(sd)
    if tied:
        sd.setdefault("output.weight", sd.get("tok_embeddings.weight"))
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in sd or sd[k] is None)
    unexpected = sorted(k for k in sd if k not in expected)
    mismatched = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(sd[k].shape)}"
                  for k in expected if k in sd and sd[k] is not None
                  and sd[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        lines = ([f"missing: {k}" for k in missing] + [f"unexpected: {k}" for k in unexpected]
                 + [f"shape mismatch: {m}" for m in mismatched])
        raise CheckpointError(f"{source}: checkpoint does not match the model:\n  "
                              + "\n  ".join(lines))
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(sd[k].to(v.dtype))
    return model


def load(cls, path: Path) -> Transformer:
    if path.is_dir():
        if (path / "config.json").exists():
            return load_hf(path)
        if (path / "params.json").exists():
            return load_meta(path)
        if (path / "ckpt.pt").exists():
            path = path / "ckpt.pt"
        else:
            raise CheckpointError(f"{path}: not a checkpoint directory (expected config.json "
                                  f"(Hugging Face), params.json (Meta) or ckpt.pt (ours))")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.suffix == ".bin" and _is_llama2c(path):
        return load_llama2c(path)
    ckpt = read_checkpoint(path)
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v
          for k, v in ckpt["model"].items()}
    return build(ModelArgs.from_dict(ckpt["model_args"]), sd, path)


def _is_llama2c(path: Path) -> bool:
    from babyllama.export import ModelFileError, read_header

    try:
        read_header(path)
        return True
    except ModelFileError:
        return False


def load_llama2c(path: Path) -> Transformer:
    """A llama2.c model file (v0/v1, or v2 dequantized to fp32)."""
    from babyllama.export import dequantized, read_model

    args, w = read_model(path)
    sd = {}
    for k, v in dequantized(w).items():
        if k.startswith("layers."):
            _, l, name = k.split(".")
            sub = "attention." if name in ("wq", "wk", "wv", "wo") else \
                "feed_forward." if name in ("w1", "w2", "w3") else ""
            k = f"layers.{l}.{sub}{name}"
        sd[k + ".weight"] = torch.from_numpy(np.array(v))
    return build(args, sd, path, tied=w.shared_classifier)


def load_hf(path: Path) -> Transformer:
    cfg = json.loads((path / "config.json").read_text())
    try:
        args = ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                         n_heads=cfg["num_attention_heads"],
                         n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                         vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"],
                         norm_eps=cfg.get("rms_norm_eps", 1e-5),
                         max_seq_len=cfg.get("max_position_embeddings", 2048),
                         rope_theta=cfg.get("rope_theta", 10000.0))
    except KeyError as e:
        raise CheckpointError(f"{path / 'config.json'}: missing field {e}") from e
    if (path / "model.safetensors").exists():
        from safetensors.torch import load_file

        sd = load_file(path / "model.safetensors")
    elif (path / "pytorch_model.bin").exists():
        sd = _torch_load(path / "pytorch_model.bin")
    else:
        raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin")
    tied = cfg.get("tie_word_embeddings", False) or "lm_head.weight" not in sd
    return build(args, from_hf(sd, args), path, tied=tied)


def load_meta(path: Path) -> Transformer:
    params = json.loads((path / "params.json").read_text())
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{path}: no consolidated.*.pth next to params.json")
    parts = [_torch_load(s) for s in shards]
    sd = {}
    for k in parts[0]:   # model-parallel shards: which dimension each weight was split along
        if k == "rope.freqs":
            continue
        ts = [p[k] for p in parts]
        if len(ts) == 1 or ts[0].dim() == 1:
            sd[k] = ts[0]
        elif k.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")):
            sd[k] = torch.cat(ts, dim=1)
        else:
            sd[k] = torch.cat(ts, dim=0)
    emb = sd.get("tok_embeddings.weight")
    w1 = sd.get("layers.0.feed_forward.w1.weight")
    if emb is None or w1 is None:
        raise CheckpointError(f"{path}: missing tok_embeddings.weight or layer 0's w1")
    args = ModelArgs(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                     n_kv_heads=params.get("n_kv_heads"), vocab_size=emb.shape[0],
                     hidden_dim=w1.shape[0], norm_eps=params.get("norm_eps", 1e-5),
                     max_seq_len=params.get("max_seq_len", 4096),
                     rope_theta=params.get("rope_theta", 10000.0))
    return build(args, sd, path)


def save_hf(model: Transformer, out_dir: Path) -> Path:
    """config.json + model.safetensors, as transformers' LlamaForCausalLM writes them."""
    from safetensors.torch import save_file

    a = model.params
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.shared_classifier:
        del sd["output.weight"]   # safetensors stores one copy; the config says it is tied
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "hidden_size": a.dim, "intermediate_size": a.hidden_dim,
           "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
           "num_key_value_heads": a.n_kv_heads, "vocab_size": a.vocab_size,
           "max_position_embeddings": a.max_seq_len, "rms_norm_eps": a.norm_eps,
           "rope_theta": a.rope_theta, "tie_word_embeddings": model.shared_classifier,
           "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in to_hf(sd, a).items()}, str(tmp),
              metadata={"format": "pt"})
    tmp.replace(out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out_dir
