"""The `babyllama` command (also `python -m babyllama`). Run `babyllama -h` for the list.

    babyllama corpus     --n 1000 --seed 0 --out out/stories.jsonl
    babyllama tokenizer  train --vocab 512 --data stories --out out/tok512
    babyllama tokenizer  export MODEL.model OUT.bin
    babyllama pretokenize --vocab 512 --data stories
    babyllama train      --preset book --out out/book [--resume] [--max-iters N] ...
    babyllama export     out/book/ckpt.pt out/model.bin --version 0   |   --hf out/hf
    babyllama export     out/book/ckpt.pt out/model.gguf --tokenizer out/tok512.model --dtype q8_0
    babyllama generate   out/model.bin -z out/tok512.bin -i "Once upon" --engine c
    babyllama chat       out/model.bin -z out/tok512.bin -y "You tell stories." --engine numpy
    babyllama finetune   --from out/book/ckpt.pt --out out/finetune -z out/tok512.bin
    babyllama eval-requests out/finetune.bin -z out/tok512.bin --n 50
    babyllama book       # the whole pipeline on the built-in corpus (the main job)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterator
from pathlib import Path

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
    D.write_corpus(a.out, a.n, a.seed)
    print(f"wrote {a.n} stories to {a.out} (and its .meta.json)")


def tokenizer_paths(vocab: int, out_dir: str = "out") -> tuple[Path, Path]:
    return Path(out_dir) / f"tok{vocab}.model", Path(out_dir) / f"tok{vocab}.bin"


def cmd_tokenizer(a) -> None:
    from babyllama.tokenizer import export_tokenizer_bin, train_tokenizer

    if a.action == "export":
        print(f"wrote {export_tokenizer_bin(a.model, a.out)}")
        return
    train, _ = D.load_corpus(a.data, a.data_dir)
    model = train_tokenizer(D.tokenizer_docs(train), a.out, a.vocab)
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
    """Tensor by tensor from a Hugging Face or Meta directory; llama2.c files refuse what they
    cannot carry (norm_eps, rope_theta) unless --approximate."""
    from babyllama.export import unrepresentable, write_gguf, write_model
    from babyllama.model import Transformer
    from babyllama.shards import open_weights

    if a.hf:
        model = Transformer.from_pretrained(a.ckpt)
        print(f"wrote {model.save_pretrained(a.hf, tokenizer=a.tokenizer)}")
        return
    if a.out is None:
        raise ValueError("export needs OUT.bin, OUT.gguf or --hf DIR")
    source = open_weights(a.ckpt)
    if a.out.suffix == ".gguf":
        if not a.tokenizer:
            raise ValueError("a GGUF file carries its vocabulary: pass --tokenizer TOK.model")
        print(f"wrote {write_gguf(source, a.tokenizer, a.out, dtype=a.dtype)}")
        return
    if a.approximate and unrepresentable(source[0]):   # measuring needs the whole model
        source = Transformer.from_pretrained(a.ckpt)
    errors: dict[str, float] = {}
    out = write_model(source, a.out, version=a.version, report=errors,
                      approximate=a.approximate)
    print(f"wrote {out}")
    for name, err in sorted(errors.items(), key=lambda kv: -kv[1])[:5]:
        print(f"    Q8_0 max error {err:.2e}  {name}")


def load_engine(path: str, engine: str, threads: int | None = None):
    """An engine over the model file. `threads` is the C engine's own; torch's thread count
    is a process global, which main() sets for one command only (torch_threads)."""
    if engine == "torch":   # anything from_pretrained reads: ckpt.pt, a HF dir, a .bin
        from babyllama.chat import TorchEngine
        from babyllama.model import Transformer

        return TorchEngine(Transformer.from_pretrained(path))
    if engine == "numpy":
        from babyllama.inference_numpy import NumpyLlama

        return NumpyLlama.load(path)
    if engine == "c":
        from babyllama.fast_c import CLlama

        return CLlama.load(path, threads=threads)
    raise ValueError(f"unknown engine {engine!r}")


@contextlib.contextmanager
def torch_threads(a: argparse.Namespace) -> Iterator[None]:
    """`--engine torch --threads N`: torch uses N threads for the command, then as many as
    before (main() may run in a process that goes on, a test or a notebook)."""
    if getattr(a, "engine", None) != "torch" or not getattr(a, "threads", None):
        yield
        return
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def cmd_generate(a) -> None:
    from babyllama.tokenizer import Tokenizer

    seed = a.seed if a.seed > 0 else int(time.time())   # run.c: 0 means "from the clock"
    engine = load_engine(a.model, a.engine, a.threads)
    tok = Tokenizer.from_bin(a.tokenizer, engine.args.vocab_size)
    prompt = tok.encode(a.prompt, bos=True)
    # a generator: the timer covers the forward passes and sampling of every engine
    t0 = time.perf_counter()
    ids = engine.generate(prompt, a.steps or engine.args.max_seq_len, a.temperature, a.topp,
                          seed, context_shift=a.keep > 0, n_keep=max(a.keep, 1))
    first: list[float] = []   # when the first new token arrived: the prompt's time ends there

    def timed(ids):
        for t in ids:
            first.append(first[0] if first else time.perf_counter())
            yield t

    sys.stdout.write(a.prompt)
    for piece in tok.stream(timed(ids), prev=prompt[-1]):
        sys.stdout.write(piece)
        sys.stdout.flush()
    t1 = time.perf_counter()
    sys.stdout.write("\n")
    n = len(first)
    print(f"[{a.engine}: {timing_line(len(prompt), n, t0, first[0] if first else t1, t1)}]",
          file=sys.stderr)


def timing_line(n_prompt: int, n_gen: int, t0: float, t_first: float, t1: float) -> str:
    """llama.cpp-style: the prompt (up to the first new token) and generation reported apart."""
    gen = f"{(n_gen - 1) / (t1 - t_first):,.1f} tok/s" if n_gen > 1 and t1 > t_first else "-"
    prompt = f"{n_prompt / (t_first - t0):,.1f} tok/s" if t_first > t0 else "-"
    return f"prompt {n_prompt} tokens, {prompt}; generated {n_gen} tokens, {gen}"


def _read_line(prompt: str) -> str | None:
    """run.c's read_stdin: the prompt, then one line without its newline; None at the end."""
    sys.stdout.write(prompt)
    sys.stdout.flush()
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def cmd_chat(a) -> None:
    """run.c's chat mode over any engine; BABYLLAMA_DUMP_IDS=FILE writes the ids fed."""
    import itertools
    import os

    from babyllama.chat import ChatSession
    from babyllama.tokenizer import Tokenizer

    seed = a.seed if a.seed > 0 else int(time.time())   # run.c: 0 means "from the clock"
    engine = load_engine(a.model, a.engine, a.threads)
    tok = Tokenizer.from_bin(a.tokenizer, engine.args.vocab_size)
    if a.keep < 0:
        raise ValueError(f"-k must be >= 0 (0 = no context shift), got {a.keep}")
    steps = a.steps
    if a.keep == 0 and (steps <= 0 or steps > engine.args.max_seq_len):
        steps = engine.args.max_seq_len   # no shift: the conversation ends with the context
    system = a.system if a.system is not None else _read_line("Enter system prompt (optional): ")
    if system is None:
        return
    session = ChatSession(engine, tok, system, a.temperature, a.topp, seed, steps,
                          max(a.keep, 1), context_shift=a.keep > 0)
    dump_path = os.environ.get("BABYLLAMA_DUMP_IDS")
    user = a.prompt if a.prompt is not None else _read_line("User: ")
    while user is not None and not session.over:
        sys.stdout.write("Assistant: ")
        sys.stdout.flush()
        replies = session.stream(user)
        first = next(replies, None)   # the turn is fed here (a ValueError if it cannot be)
        if first is not None:
            prev = session.fed[-1][-1]   # the turn's last token, before `first` is fed
            for piece in tok.stream(itertools.chain([first], replies), prev=prev):
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
        if dump_path:
            with open(dump_path, "w") as f:
                f.writelines(" ".join(map(str, ids)) + "\n" for ids in session.fed)
        if session.over:
            break
        user = _read_line("User: ")


def cmd_finetune(a) -> None:
    from babyllama.train import RUN_FIELDS, finetune

    run = {k: getattr(a, k) for k in ("max_iters", *RUN_FIELDS) if getattr(a, k, None) is not None}
    hyper = {k: getattr(a, k) for k in ("learning_rate", "batch_size", "requests", "seed")
             if getattr(a, k) is not None}
    if a.resume and hyper:
        raise ValueError("a resumed fine-tuning run keeps its checkpoint's settings; drop "
                         + ", ".join("--" + k.replace("_", "-") for k in hyper))
    if not a.resume and not a.init_from:
        raise ValueError("finetune needs --from CKPT (or --resume)")
    print(f"fine-tuned: {finetune(a.init_from, a.out_dir, a.tokenizer, a.resume, **run, **hyper)}")


def cmd_eval_requests(a) -> None:
    from babyllama.instruct import evaluate_requests
    from babyllama.tokenizer import Tokenizer

    engine = load_engine(a.model, a.engine, a.threads)
    tok = Tokenizer.from_bin(a.tokenizer)
    if tok.vocab_size != engine.args.vocab_size:
        raise ValueError(f"{a.model} has a vocabulary of {engine.args.vocab_size} tokens but the "
                         f"tokenizer {a.tokenizer} has {tok.vocab_size}")
    t0 = time.perf_counter()
    score = evaluate_requests(engine, tok, a.n, a.seed, a.temperature, a.topp)
    for req, text in score.samples[:a.show]:
        print(f"> {req.text}\n{text}\n")
    print(f"held-out requests: {score}  [{time.perf_counter() - t0:.1f}s]")


def cmd_book(a) -> None:
    """The main job: corpus -> tokenizer -> shards -> training -> export -> NumPy and C."""
    from babyllama import book
    from babyllama.tokenizer import Tokenizer

    p = book.Paths.find()
    print("1/6 corpus and tokenizer: the built-in stories, a 512-piece BPE vocabulary")
    book.ensure_tokenizer(p)
    print("2/6 pretokenize into uint16 shards")
    book.ensure_shards(p)
    print(f"3/6 train the 'book' preset ({book.BOOK_ITERS} iterations)")
    if not a.reuse and p.ckpt.exists():
        p.ckpt.unlink()
    book.ensure_model(p)
    print("4/6 export to llama2.c's formats")
    for v, path in book.ensure_exports(p).items():
        print(f"    v{v}: {path} ({path.stat().st_size:,} bytes)")
    print("5/6 generate")
    tok = Tokenizer.from_bin(p.tok_bin)
    prompt = tok.encode("Once upon a time", bos=True)
    for name in ("numpy", "c"):
        engine = load_engine(str(p.model_bin(0)), name)
        t0 = time.perf_counter()
        ids = list(engine.generate(prompt, 256, temperature=0.8, topp=0.9, seed=42))
        dt = time.perf_counter() - t0
        print(f"--- {name} engine ({len(ids) / dt:,.0f} tok/s) ---")
        print(tok.decode(prompt + ids))
    book_chat(p, tok)


def book_chat(p, tok) -> None:
    """The book's last step: instruction tuning, then three requests answered in chat mode."""
    from babyllama import book
    from babyllama.instruct import answer, evaluate_requests
    from babyllama.stories import Request, honours

    print(f"6/6 instruction tuning ({book.FINETUNE_ITERS} iterations on generated requests), "
          f"then chat")
    before = evaluate_requests(load_engine(str(p.model_bin(0)), "c"), tok, 50)
    engine = load_engine(str(book.ensure_finetuned(p)), "c")
    after = evaluate_requests(engine, tok, 50)
    print(f"    held-out requests honoured: before {before.fraction:.0%}, after "
          f"{after.fraction:.0%} ({after})")
    for request, (name, animal, obj) in zip(book.BOOK_REQUESTS, book.BOOK_REQUEST_DETAILS):
        reply = answer(engine, tok, request)   # a first chat turn, greedy as measured above
        got = honours(Request(name, False, "", animal, "", obj, request), reply)
        print(f"\n> {request}\n{reply}\n    [names {name}: {got['name']}, the {animal}: "
              f"{got['animal']}, the {obj}: {got['object']}]")


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
    s.add_argument("--tokenizer", default=None,
                   help="SentencePiece .model: the vocabulary of a GGUF file; with --hf, also "
                        "written beside the model for transformers' AutoTokenizer")
    s.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f32",
                   help="GGUF tensor type (norms stay f32)")
    s.add_argument("--approximate", action="store_true",
                   help="write a llama2.c file even when norm_eps/rope_theta differ from what "
                        "run.c assumes; prints the measured max |delta logit|")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("generate", help="generate text (run.c's flags)")
    s.add_argument("model")
    s.add_argument("-z", dest="tokenizer", required=True)
    s.add_argument("-i", dest="prompt", default="")
    s.add_argument("-t", dest="temperature", type=float, default=1.0)
    s.add_argument("-p", dest="topp", type=float, default=0.9)
    s.add_argument("-s", dest="seed", type=int, default=0)
    s.add_argument("-n", dest="steps", type=_at_least(0), default=256,
                   help="positions to run, past max_seq_len with the context shift "
                        "(0: up to the model's max_seq_len)")
    s.add_argument("-k", dest="keep", type=_at_least(0), default=1,
                   help="tokens kept when the context shifts; 0 = no shift (run.c: stop at "
                        "the end of the context)")
    s.add_argument("--engine", choices=["c", "numpy", "torch"], default="c")
    s.add_argument("--threads", type=_positive, default=None)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("chat", help="chat with Llama 2's [INST] template (run.c's -m chat)")
    s.add_argument("model")
    s.add_argument("-z", dest="tokenizer", required=True)
    s.add_argument("-y", dest="system", default=None, help="system prompt (else from stdin)")
    s.add_argument("-i", dest="prompt", default=None, help="the first user turn (else stdin)")
    s.add_argument("-t", dest="temperature", type=float, default=1.0)
    s.add_argument("-p", dest="topp", type=float, default=0.9)
    s.add_argument("-s", dest="seed", type=int, default=0)
    s.add_argument("-n", dest="steps", type=int, default=0,
                   help="positions in the whole conversation, 0 = until stdin ends")
    s.add_argument("-k", dest="keep", type=int, default=1,
                   help="tokens kept when the context shifts; 0 = no shift")
    s.add_argument("--engine", choices=["c", "numpy", "torch"], default="c")
    s.add_argument("--threads", type=_positive, default=None)
    s.set_defaults(fn=cmd_chat)
    s = sub.add_parser("finetune", help="instruction-tune a checkpoint on generated requests")
    s.add_argument("--from", dest="init_from", default=None, help="the pretrained ckpt.pt")
    s.add_argument("--out", dest="out_dir", default="out/finetune")
    s.add_argument("-z", "--tokenizer", dest="tokenizer", default="out/tok512.bin")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--max-iters", dest="max_iters", type=_positive, default=None)
    s.add_argument("--learning-rate", dest="learning_rate", type=float, default=None)
    s.add_argument("--batch-size", dest="batch_size", type=_positive, default=None)
    s.add_argument("--requests", type=_positive, default=None, help="training pairs")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--threads", type=_positive, default=None)
    s.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    s.set_defaults(fn=cmd_finetune)

    s = sub.add_parser("eval-requests", help="how often answers honour held-out requests")
    s.add_argument("model")
    s.add_argument("-z", dest="tokenizer", required=True)
    s.add_argument("--n", type=_positive, default=50)
    s.add_argument("-t", dest="temperature", type=float, default=0.0)
    s.add_argument("-p", dest="topp", type=float, default=0.9)
    s.add_argument("-s", dest="seed", type=int, default=0)
    s.add_argument("--show", type=int, default=3, help="print this many answers")
    s.add_argument("--engine", choices=["c", "numpy"], default="c")
    s.add_argument("--threads", type=_positive, default=None)
    s.set_defaults(fn=cmd_eval_requests)

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
        with torch_threads(args):
            args.fn(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        print(f"babyllama {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
