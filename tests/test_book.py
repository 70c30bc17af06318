"""The book itself: each chapter's .py and .ipynb agree, chapters do not drift from the library,
and environment.yml lists what pyproject.toml does."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import jupytext
import nbformat
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.py"))
MODULES = {"01": "tokenizer", "02": "model", "03": "train", "04": "export",
           "05": "inference_numpy", "06": "fast_c"}


def test_all_six_chapters_exist():
    assert [p.name[:2] for p in CHAPTERS] == list(MODULES)


@pytest.mark.parametrize("py", CHAPTERS, ids=lambda p: p.stem)
def test_py_and_ipynb_have_identical_cells(py):
    nb = nbformat.read(py.with_suffix(".ipynb"), as_version=4)
    text = jupytext.read(py)
    strip = lambda cells: [(c.cell_type, c.source.strip()) for c in cells]   # noqa: E731
    assert strip(nb.cells) == strip(text.cells)
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code"), \
        "the committed notebook must be executed"


def _defs(tree: ast.AST) -> dict[str, str]:
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            node = ast.parse(ast.unparse(node)).body[0]   # normalise formatting
            if ast.get_docstring(node):
                node.body = node.body[1:]
            out[node.name] = ast.unparse(node)
    return out


@pytest.mark.parametrize("py", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_definitions_equal_the_library(py):
    """A function or class a chapter defines under a library name must be the library's."""
    mod = importlib.import_module(f"babyllama.{MODULES[py.name[:2]]}")
    lib = _defs(ast.parse(Path(mod.__file__).read_text()))
    src = "\n".join(c.source for c in jupytext.read(py).cells if c.cell_type == "code")
    src = "\n".join(line for line in src.splitlines() if not line.startswith(("%", "!")))
    mine = _defs(ast.parse(src))
    shared = set(mine) & set(lib)
    for name in shared:
        assert mine[name] == lib[name], f"{py.name} redefines {name} differently from the library"


def _names(reqs: list[str]) -> dict[str, str]:
    return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower(): r.replace(" ", "") for r in reqs}


def test_environment_yml_matches_pyproject():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    want = _names(meta["dependencies"] + meta["optional-dependencies"]["dev"])
    env = (ROOT / "environment.yml").read_text()
    pip = [line.strip()[2:] for line in env.split("- pip:")[1].splitlines()
           if line.strip().startswith("- ")]
    assert _names(pip) == want
    assert "torch==2.13.0" in want.values()
