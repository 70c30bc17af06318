"""The `babyllama` command end to end, and its answers to bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from babyllama.stories import generate_stories, read_jsonl


def bl(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "babyllama", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def test_corpus(tmp_path):
    r = bl("corpus", "--n", 25, "--seed", 4, "--out", tmp_path / "c.jsonl")
    assert r.returncode == 0, r.stderr
    assert read_jsonl(tmp_path / "c.jsonl") == generate_stories(25, 4)
    assert json.loads((tmp_path / "c.jsonl").read_text().splitlines()[0]).keys() == {"story"}


def test_corpus_at_the_book_path_is_known_for_what_it_is(tmp_path):
    """`babyllama corpus` into the built-in corpus's place says which stories it holds, so the
    chapters' make_corpus neither takes 25 stories for the book's corpus nor overwrites them
    without saying so."""
    from babyllama import data as D

    path = D.corpus_path(tmp_path)
    path.parent.mkdir(parents=True)
    r = bl("corpus", "--n", 25, "--seed", 4, "--out", path)
    assert r.returncode == 0, r.stderr
    assert json.loads(path.with_suffix(".meta.json").read_text()) == {"n": 25, "seed": 4}
    written = path.stat().st_mtime_ns
    assert D.make_corpus(n=25, seed=4, data_dir=tmp_path) == path   # reused, not rewritten
    assert path.stat().st_mtime_ns == written and read_jsonl(path) == generate_stories(25, 4)
    r = subprocess.run([sys.executable, "-c", "from babyllama import data as D; import sys; "
                        "D.make_corpus(n=30, seed=0, data_dir=sys.argv[1])", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "holds 25 stories of seed 4: writing 30 stories of seed 0" in r.stdout
    assert read_jsonl(path) == generate_stories(30, 0)


@pytest.mark.parametrize("args,msg", [
    (["nonsense"], "invalid choice"),
    (["corpus", "--bogus", "1"], "unrecognized arguments"),
    (["corpus", "--n", "0"], "expected a positive integer, got 0"),
    (["corpus", "--n", "-3"], "expected a positive integer, got -3"),
    (["corpus", "--out", "/proc/no/such/dir/x.jsonl"], "cannot write to"),
    ([], "usage"),
])
def test_usage_errors_exit_2(args, msg):
    r = bl(*args)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


def test_library_errors_are_one_line(tmp_path):
    r = bl("export", tmp_path / "missing.pt", tmp_path / "o.bin")
    assert r.returncode == 1 and "no such checkpoint" in r.stderr and "Traceback" not in r.stderr
    r = bl("generate", tmp_path / "missing.bin", "-z", tmp_path / "t.bin", "--engine", "numpy")
    assert r.returncode == 1 and "cannot read model file" in r.stderr


def test_tokenizer_pretokenize_train_export_generate(tmp_path):
    """The chapters' commands in sequence, on a tiny corpus in a scratch directory."""
    data = tmp_path / "data"
    from babyllama import data as D

    D.make_corpus(n=600, seed=0, data_dir=data)
    r = bl("tokenizer", "train", "--vocab", 400, "--data-dir", data, "--out", tmp_path / "tok")
    assert r.returncode == 0, r.stderr
    r = bl("pretokenize", "--vocab", 400, "--data-dir", data, "--tokenizer", tmp_path / "tok.model")
    assert r.returncode == 0, r.stderr
    r = bl("train", "--preset", "stories260K", "--vocab-size", 400, "--data-dir", data,
           "--out", tmp_path / "run", "--max-iters", 3, "--max-seq-len", 64, "--batch-size", 4,
           "--eval-iters", 1, "--no-progress")
    assert r.returncode == 0, r.stderr
    for v in (0, 2):
        r = bl("export", tmp_path / "run" / "ckpt.pt", tmp_path / f"m{v}.bin", "--version", v)
        assert r.returncode == 0, r.stderr
    r = bl("export", tmp_path / "run" / "ckpt.pt", "--hf", tmp_path / "hf")
    assert r.returncode == 0 and (tmp_path / "hf" / "model.safetensors").exists()
    outs = {}
    for engine in ("numpy", "c", "torch"):   # torch: the PyTorch forward, run.c's sampler
        r = bl("generate", tmp_path / "m0.bin", "-z", tmp_path / "tok.bin", "-i", "Once upon",
               "-t", 0.9, "-s", 5, "-n", 40, "--engine", engine)
        assert r.returncode == 0, r.stderr
        outs[engine] = r.stdout
        n = len(r.stdout) - len("Once upon\n")
        assert f"[{engine}: " in r.stderr and (n == 0) == (f"[{engine}: 0 pieces" in r.stderr)
    assert outs["numpy"] == outs["c"] == outs["torch"] and outs["c"].startswith("Once upon")
    r = bl("generate", tmp_path / "hf", "-z", tmp_path / "tok.bin", "-i", "Once", "-n", 20,
           "--engine", "torch", "-s", 1)
    assert r.returncode == 0 and r.stdout.startswith("Once"), r.stderr
    r = bl("generate", tmp_path / "m0.bin", "-z", tmp_path / "tok.bin", "-t", -1,
           "--engine", "numpy")
    assert r.returncode == 1 and "temperature must be >= 0" in r.stderr



def test_torch_engine_is_lazy_and_shares_the_sampler(monkeypatch):
    """`generate --engine torch` times the work it does: nothing runs before the first token is
    asked for; and it draws each token with run.c's sampler, as the NumPy engine does."""
    import numpy as np
    from helpers import scaled_model

    from babyllama import inference_numpy as N
    from babyllama.chat import TorchEngine
    from babyllama.model import PRESETS

    engine = TorchEngine(scaled_model(PRESETS["stories260K"], scale=20.0))
    calls, drawn = [], []
    real = engine.forward_tokens
    monkeypatch.setattr(engine, "forward_tokens", lambda t, p: calls.append(p) or real(t, p))

    def argmax_sample(logits, temperature, topp, rng):
        drawn.append(logits)
        return int(np.argmax(logits))

    monkeypatch.setattr(N, "sample", argmax_sample)
    ids = engine.generate([1, 403, 261], 20, temperature=1.0, topp=0.9, seed=3)
    assert calls == []
    first = next(ids)
    assert calls == [0] and len(drawn) == 1 and first == int(np.argmax(drawn[0]))


def readme_commands() -> list[list[str]]:
    """The `babyllama` command lines of README.md's bash blocks (torchrun's after `-m`)."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [ln for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for ln in block.splitlines()]
    cmds = []
    for ln in lines:
        argv = shlex.split(ln, comments=True)
        if "babyllama" in argv and argv[0] in ("babyllama", "torchrun"):
            cmds.append(argv[argv.index("babyllama") + 1:])
    return cmds


def test_readme_commands_parse_and_bound_their_training(tmp_path, monkeypatch):
    """Pasted as written, every README command line is one the CLI accepts (no `a|b` shell
    pipes, no stale flag), and none trains for TrainConfig's default 600 iterations of 32."""
    from babyllama.cli import build_parser

    cmds = readme_commands()
    assert len(cmds) >= 12 and any(c[0] == "finetune" for c in cmds)
    monkeypatch.chdir(tmp_path)   # `export ... OUT` probes its output directory while parsing
    parser = build_parser()
    for argv in cmds:
        a = parser.parse_args(argv)
        if a.command == "train":
            assert a.resume or (a.max_iters is not None and a.batch_size is not None), argv
