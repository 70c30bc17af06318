"""Checkpoints users already have, for chapter 02's `Transformer.from_pretrained`/`save_pretrained`.

Three layouts, one set of names (ours, which are Meta's):
- ours: a training checkpoint `ckpt.pt` {"model_args", "model", ...} (or a directory holding one);
- Hugging Face: config.json + model.safetensors (or pytorch_model.bin), names model.layers.N...;
- Meta: params.json + consolidated.NN.pth, sharded across model-parallel ranks when NN > 00.

Every .pt/.pth/.bin is read with torch.load(weights_only=True): tensors only, never code.
Hugging Face and Meta directories are opened lazily (babyllama.shards: sharded indexes, several
model-parallel files) and copied into the model one tensor at a time. What our Llama cannot
represent (biases, rope scaling, another activation, a tied flag the tensors contradict) is
refused with a CheckpointError rather than loaded as a different model.
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


def _torch_load(path: Path, mmap: bool = False) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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


def hf_to_ours(k: str, args: ModelArgs) -> tuple[str | None, int | None]:
    """(our name or None for a buffer to drop, heads to un-permute by or None) of a HF name.
    An unknown name is kept as it is: `build` reports it as unexpected."""
    inv = {v: k for k, v in HF_NAMES.items()}
    inv_top = {v: k for k, v in HF_TOP.items()}
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", k)
    if m and m.group(2) in inv:
        name = inv[m.group(2)]
        heads = {"attention.wq.weight": args.n_heads,
                 "attention.wk.weight": args.n_kv_heads}.get(name)
        return f"layers.{m.group(1)}.{name}", heads
    if k in inv_top:
        return inv_top[k], None
    if k.endswith("rotary_emb.inv_freq"):   # a buffer older transformers saved
        return None, None
    return k, None


def from_hf(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        name, heads = hf_to_ours(k, args)
        if name is not None:
            out[name] = permute_from_hf(v, heads) if heads else v
    return out


# ----------------------------------------------------------------------------------------------
# building a model from a state dict, with an error that lists every problem

def check_names(args: ModelArgs, shapes: dict[str, tuple[int, ...]], source: Path,
                tied: bool) -> None:
    """Raise a CheckpointError listing every tensor missing, unexpected or of the wrong shape."""
    from babyllama.export import layer_shapes

    expected = {"tok_embeddings.weight": (args.vocab_size, args.dim), "norm.weight": (args.dim,),
                "output.weight": (args.vocab_size, args.dim)}

    sub = {"wq": "attention.", "wk": "attention.", "wv": "attention.", "wo": "attention.",
           "w1": "feed_forward.", "w2": "feed_forward.", "w3": "feed_forward."}
    for l in range(args.n_layers):
        for name, shape in layer_shapes(args).items():
            expected[f"layers.{l}.{sub.get(name, '')}{name}.weight"] = shape
    shapes = dict(shapes)
    if tied and "tok_embeddings.weight" in shapes:
        shapes.setdefault("output.weight", shapes["tok_embeddings.weight"])
    lines = ([f"missing: {k}" for k in sorted(expected) if k not in shapes]
             + [f"unexpected: {k}" for k in sorted(shapes) if k not in expected]
             + [f"shape mismatch: {k}: expected {v}, found {shapes[k]}"
                for k, v in expected.items() if k in shapes and shapes[k] != v])
    if lines:
        raise CheckpointError(f"{source}: checkpoint does not match the model:\n  "
                              + "\n  ".join(lines))


def build(args: ModelArgs, sd, source: Path, tied: bool | None = None) -> Transformer:
    """A Transformer holding the tensors of `sd` (a dict, or a lazy mapping with `.shapes`, read
    one tensor at a time)."""
    shapes = getattr(sd, "shapes", None) or {k: tuple(v.shape) for k, v in sd.items()
                                             if v is not None}
    if tied is None:
        tied = "output.weight" not in shapes or torch.equal(sd["output.weight"],
                                                            sd["tok_embeddings.weight"])
    check_names(args, shapes, source, tied)
    model = Transformer(args)
    if not tied:
        model.output.weight = nn.Parameter(model.tok_embeddings.weight.detach().clone())
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if not (tied and k == "output.weight"):   # tied: the embedding's own storage
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


# ----------------------------------------------------------------------------------------------
# refusing what our model cannot represent, rather than loading a different model

def hf_unsupported(cfg: dict) -> list[str]:
    """What a Hugging Face config asks for that our Llama cannot do (empty: nothing)."""
    bad = []
    if cfg.get("model_type", "llama") != "llama":
        bad.append(f"model_type {cfg['model_type']!r} (only 'llama' is supported)")
    if cfg.get("hidden_act", "silu") != "silu":
        bad.append(f"hidden_act {cfg['hidden_act']!r} (our feed-forward is SwiGLU: 'silu')")
    for k in ("attention_bias", "mlp_bias"):
        if cfg.get(k):
            bad.append(f"{k} = true (our linear layers have no biases)")
    scaling = cfg.get("rope_scaling")
    rope_type = (cfg.get("rope_parameters") or {}).get("rope_type", "default")
    if scaling:
        bad.append(f"rope_scaling {scaling} (we implement plain RoPE only)")
    if rope_type != "default":
        bad.append(f"rope_parameters.rope_type {rope_type!r} (we implement plain RoPE only)")
    hd = cfg.get("head_dim")
    if hd is not None and hd * cfg.get("num_attention_heads", 1) != cfg.get("hidden_size"):
        bad.append(f"head_dim {hd} != hidden_size / num_attention_heads")
    return bad


def hf_rope_theta(cfg: dict) -> float:
    """transformers 5 keeps rope_theta inside rope_parameters; 4.x at the top level."""
    return float((cfg.get("rope_parameters") or {}).get("rope_theta",
                                                          cfg.get("rope_theta", 10000.0)))


META_FIELDS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
               "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len", "max_batch_size",
               "use_scaled_rope"}


def meta_unsupported(params: dict) -> list[str]:
    bad = [f"unknown field {k!r} (cannot tell whether our model represents it)"
           for k in sorted(params) if k not in META_FIELDS]
    if params.get("use_scaled_rope"):
        bad.append("use_scaled_rope = true (Llama 3.1's rope scaling; we implement plain RoPE)")
    return bad


def _refuse(source: Path, bad: list[str]) -> None:
    if bad:
        raise CheckpointError(f"{source}: this checkpoint needs what babyllama's Llama cannot "
                              f"represent:\n  " + "\n  ".join(bad))


def check_tied(source: Path, says_tied: bool, sd: dict, emb: str, out: str) -> bool:
    """Whether the classifier is tied, consistent between the config and the tensors."""
    if out not in sd:
        if not says_tied:
            raise CheckpointError(f"{source}: the config says the classifier is not tied "
                                  f"(tie_word_embeddings false or absent), but there is no {out}")
        return True
    if says_tied and not torch.equal(sd[out], sd[emb]):
        raise CheckpointError(f"{source}: the config says the classifier is tied to {emb} "
                              f"(tie_word_embeddings true), but {out} differs from it")
    return says_tied


def open_hf(path: Path):
    """(args, lazy state dict in our names, tied) of a Hugging Face directory."""
    cfg = json.loads((path / "config.json").read_text())
    _refuse(path / "config.json", hf_unsupported(cfg))
    try:
        args = ModelArgs(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                         n_heads=cfg["num_attention_heads"],
                         n_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
                         vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"],
                         norm_eps=cfg.get("rms_norm_eps", 1e-5),
                         max_seq_len=cfg.get("max_position_embeddings", 2048),
                         rope_theta=hf_rope_theta(cfg))
    except KeyError as e:
        raise CheckpointError(f"{path / 'config.json'}: missing field {e}") from e
    from babyllama.shards import LazyStateDict, hf_tensor_files, read_tensor

    files, shapes = hf_tensor_files(path)
    biases = sorted(k for k in shapes if k.endswith(".bias"))
    _refuse(path, [f"{k} (our linear layers have no biases)" for k in biases])
    sd = LazyStateDict()
    for k, f in files.items():
        name, heads = hf_to_ours(k, args)
        if name is not None:
            sd.add(name, shapes[k], _hf_reader(f, k, heads, read_tensor))
    tied = check_tied(path, cfg.get("tie_word_embeddings", False), sd,
                      "tok_embeddings.weight", "output.weight")
    return args, sd, tied


def _hf_reader(file: Path, name: str, heads: int | None, read):
    def get() -> torch.Tensor:
        t = read(file, name)
        return permute_from_hf(t, heads) if heads else t
    return get


def load_hf(path: Path) -> Transformer:
    args, sd, tied = open_hf(path)
    return build(args, sd, path, tied=tied)


def open_meta(path: Path):
    """(args, lazy state dict, tied) of Meta's params.json + consolidated.NN.pth."""
    from babyllama.shards import meta_state_dict

    params = json.loads((path / "params.json").read_text())
    _refuse(path / "params.json", meta_unsupported(params))
    sd = meta_state_dict(path)
    emb = sd.shapes.get("tok_embeddings.weight")
    w1 = sd.shapes.get("layers.0.feed_forward.w1.weight")
    if emb is None or w1 is None:
        raise CheckpointError(f"{path}: missing tok_embeddings.weight or layer 0's w1")
    args = ModelArgs(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                     n_kv_heads=params.get("n_kv_heads"), vocab_size=emb[0],
                     hidden_dim=w1[0], norm_eps=params.get("norm_eps", 1e-5),
                     max_seq_len=params.get("max_seq_len", 4096),
                     rope_theta=params.get("rope_theta", 10000.0))
    tied = "output.weight" not in sd or torch.equal(sd["output.weight"],
                                                    sd["tok_embeddings.weight"])
    return args, sd, tied


def load_meta(path: Path) -> Transformer:
    args, sd, tied = open_meta(path)
    return build(args, sd, path, tied=tied)


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
