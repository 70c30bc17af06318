"""The `babyllama` command (also `python -m babyllama`). Run `babyllama -h` for the list.

    babyllama corpus     --n 1000 --seed 0 --out out/stories.jsonl
    babyllama tokenizer  train --vocab 512 --data stories --out out/tok512
    babyllama tokenizer  export MODEL.model OUT.bin
    babyllama pretokenize --vocab 512 --data stories
    babyllama train      --preset book --out out/book [--resume] [--max-iters N] ...
    babyllama export     out/book/ckpt.pt out/model.bin --version 0   |   --hf out/hf
    babyllama generate   out/model.bin -z out/tok512.bin -i "Once upon" --engine c
    babyllama book       # the whole pipeline on the built-in corpus (the main job)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from babyllama import data as D


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _at_least(lo: int):
    """An argparse type: an integer >= lo."""
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {n}")
        return n
    return parse


def _writable(path: str) -> Path:
    """An output path whose directory exists (or can be made) and is writable."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        probe = p.parent / f".{p.name}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write to {path}: {e.strerror or e}") from None
    return p


# ----------------------------------------------------------------------------------------------
# subcommands

def cmd_corpus(a) -> None:
    from babyllama.stories import generate_stories, write_jsonl

    write_jsonl(generate_stories(a.n, a.seed), a.out)
    print(f"wrote {a.n} stories to {a.out}")


def tokenizer_paths(vocab: int, out_dir: str = "out") -> tuple[Path, Path]:
    return Path(out_dir) / f"tok{vocab}.model", Path(out_dir) / f"tok{vocab}.bin"


def cmd_tokenizer(a) -> None:
    from babyllama.tokenizer import export_tokenizer_bin, train_tokenizer

    if a.action == "export":
        print(f"wrote {export_tokenizer_bin(a.model, a.out)}")
        return
    train, _ = D.load_corpus(a.data, a.data_dir)
    model = train_tokenizer(train, a.out, a.vocab)
    print(f"wrote {model} and {export_tokenizer_bin(model, model.with_suffix('.bin'))}")


def cmd_pretokenize(a) -> None:
    model = Path(a.tokenizer or tokenizer_paths(a.vocab)[0])
    if not model.exists():
        raise FileNotFoundError(f"{model}: no tokenizer; make it with `babyllama tokenizer train "
                                f"--vocab {a.vocab} --data {a.data}`")
    train, val = D.load_corpus(a.data, a.data_dir)
    out = D.pretokenize(train, val, model, D.shard_dir(a.data, a.vocab, a.data_dir))
    print(f"wrote shards to {out}")


def cmd_train(a) -> None:
    from babyllama.train import RUN_FIELDS, TrainConfig, TrainingError, saved_config, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(a).items() if k in fields and v is not None}
    if a.resume:   # the checkpoint's settings; only how the run runs may change (RUN_FIELDS)
        out_dir = Path(given.get("out_dir", TrainConfig.out_dir))
        saved = saved_config(out_dir / "ckpt.pt")
        clash = [f"--{k.replace('_', '-')} {v} (checkpoint: {saved[k]})" for k, v in given.items()
                 if k not in (*RUN_FIELDS, "out_dir") and k in saved and saved[k] != v]
        if clash:
            raise TrainingError("a resumed run keeps its checkpoint's settings; these flags "
                                "differ: " + ", ".join(clash))
        given = {**saved, **given}
    print(f"trained: {train(TrainConfig(**given), resume=a.resume)}")


def cmd_export(a) -> None:
    from babyllama.export import write_model
    from babyllama.model import Transformer

    model = Transformer.from_pretrained(a.ckpt)
    if a.hf:
        print(f"wrote {model.save_pretrained(a.hf)}")
    elif a.out:
        errors: dict[str, float] = {}
        print(f"wrote {write_model(model, a.out, version=a.version, report=errors)}")
        for name, err in sorted(errors.items(), key=lambda kv: -kv[1])[:5]:
            print(f"    Q8_0 max error {err:.2e}  {name}")
    else:
        raise ValueError("export needs OUT.bin or --hf DIR")


class TorchEngine:
    """The PyTorch model behind the engines' interface: its forward pass with the KV cache, and
    run.c's sampler (the NumPy one), so `--engine torch` samples, streams and stops as the
    NumPy and C engines do."""

    def __init__(self, model):
        import torch

        self.torch, self.model = torch, model.eval()
        self.args = model.params

    def reset(self) -> None:
        self.model.reset_cache()

    def forward_tokens(self, tokens: list[int], pos: int) -> np.ndarray:
        with self.torch.inference_mode():
            x = self.torch.tensor([tokens])
            logits, _ = self.model(x, start_pos=pos, use_cache=True)
        return logits[0].float().numpy()

    def forward(self, token: int, pos: int) -> np.ndarray:
        return self.forward_tokens([token], pos)[0]

    def sample(self, logits: np.ndarray, temperature: float, topp: float, rng) -> int:
        from babyllama.inference_numpy import sample

        return sample(logits, temperature, topp, rng)

    def generate(self, prompt_ids: list[int], steps: int, temperature: float = 1.0,
                 topp: float = 0.9, seed: int | None = None) -> Iterator[int]:
        from babyllama.inference_numpy import generate_loop

        yield from generate_loop(self, prompt_ids, steps, temperature, topp, seed)


def load_engine(path: str, engine: str, threads: int | None = None):
    if engine == "torch":   # anything from_pretrained reads: ckpt.pt, a HF dir, a .bin
        from babyllama.model import Transformer

        if threads:
            import torch

            torch.set_num_threads(threads)
        return TorchEngine(Transformer.from_pretrained(path))
    if engine == "numpy":
        from babyllama.inference_numpy import NumpyLlama

        return NumpyLlama.load(path)
    if engine == "c":
        from babyllama.fast_c import CLlama

        return CLlama.load(path, threads=threads)
    raise ValueError(f"unknown engine {engine!r}")


def cmd_generate(a) -> None:
    from babyllama.tokenizer import Tokenizer

    seed = a.seed if a.seed > 0 else int(time.time())   # run.c: 0 means "from the clock"
    engine = load_engine(a.model, a.engine, a.threads)
    tok = Tokenizer.from_bin(a.tokenizer, engine.args.vocab_size)
    prompt = tok.encode(a.prompt, bos=True)
    # a generator: the timer below covers the forward passes and sampling of every engine
    ids = engine.generate(prompt, a.steps or engine.args.max_seq_len, a.temperature, a.topp,
                          seed)
    sys.stdout.write(a.prompt)
    t0, n = time.perf_counter(), 0
    for piece in tok.stream(ids, prev=prompt[-1]):
        sys.stdout.write(piece)
        sys.stdout.flush()
        n += 1
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    print(f"[{a.engine}: {n} pieces in {dt:.2f}s]", file=sys.stderr)


def cmd_book(a) -> None:
    """The main job: corpus -> tokenizer -> shards -> training -> export -> NumPy and C."""
    from babyllama import book
    from babyllama.tokenizer import Tokenizer

    p = book.Paths.find()
    print("1/5 corpus and tokenizer: the built-in stories, a 512-piece BPE vocabulary")
    book.ensure_tokenizer(p)
    print("2/5 pretokenize into uint16 shards")
    book.ensure_shards(p)
    print(f"3/5 train the 'book' preset ({book.BOOK_ITERS} iterations)")
    if not a.reuse and p.ckpt.exists():
        p.ckpt.unlink()
    book.ensure_model(p)
    print("4/5 export to llama2.c's formats")
    for v, path in book.ensure_exports(p).items():
        print(f"    v{v}: {path} ({path.stat().st_size:,} bytes)")
    print("5/5 generate")
    tok = Tokenizer.from_bin(p.tok_bin)
    prompt = tok.encode("Once upon a time", bos=True)
    for name in ("numpy", "c"):
        engine = load_engine(str(p.model_bin(0)), name)
        t0 = time.perf_counter()
        ids = list(engine.generate(prompt, 256, temperature=0.8, topp=0.9, seed=42))
        dt = time.perf_counter() - t0
        print(f"--- {name} engine ({len(ids) / dt:,.0f} tok/s) ---")
        print(tok.decode(prompt + ids))


# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from babyllama.train import INT_MIN, TrainConfig

    p = argparse.ArgumentParser(prog="babyllama", description="Rebuild llama2.c, end to end.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("corpus", help="write the built-in story corpus as JSON Lines")
    s.add_argument("--n", type=_positive, default=D.BOOK_STORIES)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=_writable, default=D.corpus_path())
    s.set_defaults(fn=cmd_corpus)

    s = sub.add_parser("tokenizer", help="train a tokenizer or export one to tokenizer.bin")
    ts = s.add_subparsers(dest="action", required=True)
    t = ts.add_parser("train")
    t.add_argument("--vocab", type=_positive, default=512)
    t.add_argument("--data", choices=["stories", "tinystories"], default="stories")
    t.add_argument("--data-dir", default=str(D.DATA_DIR))
    t.add_argument("--out", default=None)
    t.set_defaults(fn=cmd_tokenizer)
    t = ts.add_parser("export")
    t.add_argument("model")
    t.add_argument("out", type=_writable)
    t.set_defaults(fn=cmd_tokenizer)

    s = sub.add_parser("pretokenize", help="encode a corpus into uint16 shards")
    s.add_argument("--vocab", type=_positive, default=512)
    s.add_argument("--data", choices=["stories", "tinystories"], default="stories")
    s.add_argument("--data-dir", default=str(D.DATA_DIR))
    s.add_argument("--tokenizer", default=None, help="default: out/tok{vocab}.model")
    s.set_defaults(fn=cmd_pretokenize)

    s = sub.add_parser("train", help="train a model")
    s.add_argument("--resume", action="store_true")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            s.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            typ = {"int": int, "float": float, "int | None": int, "str": str}.get(str(f.type), str)
            typ = _at_least(INT_MIN[f.name]) if f.name in INT_MIN else typ
            s.add_argument(flag, dest=f.name, type=typ, default=None,
                           help=f"default: {f.default}")
    s.add_argument("--out", dest="out_dir", default=None)
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("export", help="write a checkpoint as a llama2.c file or a HF directory")
    s.add_argument("ckpt")
    s.add_argument("out", nargs="?", type=_writable)
    s.add_argument("--version", type=int, choices=[0, 1, 2], default=0)
    s.add_argument("--hf", default=None, help="write a Hugging Face directory instead")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("generate", help="generate text (run.c's flags)")
    s.add_argument("model")
    s.add_argument("-z", dest="tokenizer", required=True)
    s.add_argument("-i", dest="prompt", default="")
    s.add_argument("-t", dest="temperature", type=float, default=1.0)
    s.add_argument("-p", dest="topp", type=float, default=0.9)
    s.add_argument("-s", dest="seed", type=int, default=0)
    s.add_argument("-n", dest="steps", type=_at_least(0), default=256,
                   help="tokens to generate (0: up to the model's max_seq_len)")
    s.add_argument("--engine", choices=["c", "numpy", "torch"], default="c")
    s.add_argument("--threads", type=_positive, default=None)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("book", help="the main job: the whole book on the built-in corpus, "
                                    "into out/ beside pyproject.toml")
    s.add_argument("--reuse", action="store_true", help="reuse an existing out/book/ckpt.pt")
    s.set_defaults(fn=cmd_book)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "tokenizer" and getattr(args, "action", "") == "train":
        args.out = args.out or str(tokenizer_paths(args.vocab)[0].with_suffix(""))
    try:
        args.fn(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        print(f"babyllama {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
