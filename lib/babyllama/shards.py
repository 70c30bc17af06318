"""Large checkpoints in bounded memory: every tensor named and shaped up front, read when asked.

    from babyllama.shards import open_weights
    args, w, shared = open_weights("llama-2-13b-hf/")   # config.json + sharded safetensors
    write_model((args, w, shared), "out/13b.bin")        # converted one tensor at a time

Hugging Face checkpoints over a few GB are sharded: `model.safetensors.index.json` maps each
tensor to its file. Meta's 13B and larger are split across model-parallel ranks,
consolidated.00.pth, 01, ...: each weight is cut along the dimension its rank computed (the
output rows of wq, wk, wv, w1, w3 and the classifier; the input columns of wo, w2 and the
embedding's feature columns); norms are copied whole into every shard. A tensor is read by
opening its file, taking that one tensor and closing the file again, so what the process holds
is about one tensor (twice, for the moment a conversion copies it), never the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from babyllama.checkpoints import CheckpointError, _torch_load

META_SPLIT_DIM1 = ("wo.weight", "w2.weight", "tok_embeddings.weight")   # the rest: dim 0


class LazyStateDict(Mapping):
    """Our state-dict names -> torch tensors, each read from disk only when asked for."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._read: dict[str, Callable[[], torch.Tensor]] = {}

    def add(self, name: str, shape, read: Callable[[], torch.Tensor]) -> None:
        self.shapes[name], self._read[name] = tuple(shape), read

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._read[name]()

    def __contains__(self, name) -> bool:
        return name in self.shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


# ----------------------------------------------------------------------------------------------
# Hugging Face: one file, or an index naming a shard for each tensor

def _file_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:   # safetensors raises its own error types for a corrupt header
            raise CheckpointError(f"{file}: cannot read as safetensors: {e}") from e
    return {k: tuple(v.shape) for k, v in _torch_load(file, mmap=True).items()}


def read_tensor(file: Path, name: str) -> torch.Tensor:
    """One tensor of a .safetensors or .bin file, the file closed again afterwards."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name)
    return _torch_load(file, mmap=True)[name].clone()


def hf_tensor_files(path: Path) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
    """(HF tensor name -> its file, name -> shape), every shard checked against the index."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a shard index with a weight_map ({e})") from e
            files = {k: path / f for k, f in weight_map.items()}
            break
        if (path / single).exists():
            files = None
            index = path / single
            break
    else:
        raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or a sharded "
                              f"index (model.safetensors.index.json)")
    if files is None:
        shapes = _file_shapes(index)
        return {k: index for k in shapes}, shapes
    for f in sorted(set(files.values())):
        if not f.exists():
            first = next(k for k, v in files.items() if v == f)
            raise CheckpointError(f"{index}: names shard {f.name} (for {first} and others), "
                                  f"which does not exist")
    shapes: dict[str, tuple[int, ...]] = {}
    seen: dict[str, Path] = {}
    for f in sorted(set(files.values())):
        for k, shape in _file_shapes(f).items():
            if k in seen:
                raise CheckpointError(f"{path}: tensor {k} is in two shards, {seen[k].name} and "
                                      f"{f.name}")
            seen[k] = f
            if files.get(k) != f:
                raise CheckpointError(f"{f}: holds tensor {k}, but {index.name} "
                                      + (f"puts it in {files[k].name}" if k in files
                                         else "does not list it"))
            shapes[k] = shape
    absent = sorted(k for k in files if k not in seen)
    if absent:
        raise CheckpointError(f"{index}: puts tensor {absent[0]} in {files[absent[0]].name}, "
                              f"which does not hold it" + (f" ({len(absent) - 1} more missing)"
                                                           if len(absent) > 1 else ""))
    return files, shapes


# ----------------------------------------------------------------------------------------------
# Meta: model-parallel shards, concatenated along each weight's split dimension

def meta_state_dict(path: Path) -> LazyStateDict:
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{path}: no consolidated.*.pth next to params.json")
    shapes = [{k: tuple(v.shape) for k, v in _torch_load(s, mmap=True).items()} for s in shards]
    sd = LazyStateDict()
    for s, sh in zip(shards[1:], shapes[1:]):
        odd = sorted(set(sh) ^ set(shapes[0]))
        if odd:
            where = s.name if odd[0] not in sh else shards[0].name
            raise CheckpointError(f"{path}: tensor {odd[0]} is missing from {where}: every "
                                  f"model-parallel shard must hold the same tensors")
    for k, shape0 in shapes[0].items():
        if k == "rope.freqs":   # a buffer, not a weight: we compute it
            continue
        dim = None if len(shards) == 1 or len(shape0) == 1 else \
            1 if k.endswith(META_SPLIT_DIM1) else 0
        for s, sh in zip(shards[1:], shapes[1:]):
            other = [d for i, d in enumerate(sh[k]) if i != dim]
            if len(sh[k]) != len(shape0) or other != [d for i, d in enumerate(shape0)
                                                        if i != dim]:
                rule = "be identical" if dim is None else f"agree except along dim {dim}"
                raise CheckpointError(f"{s}: {k} has shape {sh[k]} but {shards[0].name} has "
                                      f"{shape0}: model-parallel shards must {rule}")
        total = list(shape0)
        if dim is not None:
            total[dim] = sum(sh[k][dim] for sh in shapes)
        sd.add(k, total, _meta_reader(shards, k, dim))
    return sd


def _meta_reader(shards: list[Path], name: str, dim: int | None) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        if dim is None:
            return _torch_load(shards[0], mmap=True)[name].clone()
        return torch.cat([_torch_load(s, mmap=True)[name] for s in shards], dim=dim)
    return read


# ----------------------------------------------------------------------------------------------
# the view the exporters want: our per-layer names -> fp32 NumPy arrays

EXPORT_NAMES = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv",
                "wo": "attention.wo", "w1": "feed_forward.w1", "w2": "feed_forward.w2",
                "w3": "feed_forward.w3", "attention_norm": "attention_norm",
                "ffn_norm": "ffn_norm"}


class ExportView(Mapping):
    """export.py's names (layers.3.wq, tok_embeddings) over a lazy state dict, as fp32."""

    def __init__(self, sd: LazyStateDict, tied: bool):
        self.sd, self.tied = sd, tied

    def _key(self, name: str) -> str:
        if name == "output" and self.tied:
            return "tok_embeddings.weight"
        if name.startswith("layers."):
            _, l, short = name.split(".")
            return f"layers.{l}.{EXPORT_NAMES[short]}.weight"
        return name + ".weight"

    def __getitem__(self, name: str) -> np.ndarray:
        return self.sd[self._key(name)].float().numpy()

    def __contains__(self, name) -> bool:
        return self._key(name) in self.sd

    def __iter__(self) -> Iterator[str]:
        raise TypeError("an ExportView is read by name, one tensor at a time")

    def __len__(self) -> int:
        return len(self.sd)


def open_weights(path: str | Path):
    """(ModelArgs, export-named weights, shared classifier) of any checkpoint from_pretrained
    reads. Hugging Face and Meta directories stay on disk and are read tensor by tensor; the
    others (ours, llama2.c files: small by nature) are loaded whole."""
    from babyllama import checkpoints
    from babyllama.export import weights_from_torch
    from babyllama.model import Transformer

    path = Path(path)
    if path.is_dir() and ((path / "config.json").exists() or (path / "params.json").exists()):
        opener = checkpoints.open_hf if (path / "config.json").exists() else \
            checkpoints.open_meta
        args, sd, tied = opener(path)
        checkpoints.check_names(args, sd.shapes, path, tied)   # every problem, before writing
        return args, ExportView(sd, tied), tied
    return weights_from_torch(Transformer.from_pretrained(path))
