"""`make test` never touches what `make run` made: the book's artifacts (chapters run by nbval,
the benchmark models) go to $BABYLLAMA_OUT, a directory of the session's own (issue 17, item 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHERE = ("from babyllama.book import Paths; import bench_engines; "
         "print(Paths.find().out); print(bench_engines.OUT)")


def where(cwd: Path, env: dict) -> list[str]:
    env = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"), str(ROOT / "bench")])}
    r = subprocess.run([sys.executable, "-c", WHERE], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_this_session_writes_outside_out():
    own = Path(os.environ["BABYLLAMA_OUT"]).resolve()
    assert own.is_dir() and ROOT / "out" not in (own, *own.parents)


def test_the_chapters_and_the_benchmark_follow_the_variable(tmp_path):
    plain = {k: v for k, v in os.environ.items() if k != "BABYLLAMA_OUT"}
    for cwd in (ROOT, ROOT / "book"):   # where a notebook kernel starts
        assert where(cwd, plain) == [str(ROOT / "out"), str(ROOT / "out" / "bench")]
        assert where(cwd, {**plain, "BABYLLAMA_OUT": str(tmp_path)}) == [
            str(tmp_path), str(tmp_path / "bench")]


def test_artifacts_land_in_the_variable_directory(tmp_path, monkeypatch):
    from babyllama import book

    monkeypatch.setenv("BABYLLAMA_OUT", str(tmp_path))
    p = book.Paths.find(ROOT / "book")
    assert p.root == ROOT and p.out == tmp_path
    assert p.ckpt == tmp_path / "book" / "ckpt.pt" and p.model_bin(0) == tmp_path / "book_v0.bin"
    assert p.data == tmp_path / "data" and p.tok_bin == tmp_path / "tok512.bin"
