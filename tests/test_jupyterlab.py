"""The chapters in JupyterLab, through jupytext's contents manager (what the server uses): paired
however the server is started, and opening + saving a chapter changes no file (issue 17)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
pytest.importorskip("jupyter_server")

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p.stem for p in (ROOT / "book").glob("[0-9][0-9]_*.py"))


def copy_book(tmp_path: Path) -> Path:
    """The repository's book/ (chapters and its jupytext.toml) in a scratch repository."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "book", repo / "book", ignore=shutil.ignore_patterns(".ipynb_*"))
    return repo


def run(coro):
    return asyncio.run(coro)


def n_outputs(nb) -> int:
    return sum(len(c.get("outputs", [])) for c in nb["cells"] if c["cell_type"] == "code")


@pytest.mark.parametrize("server_root", ["book", "."])
def test_pairing_holds_whether_the_server_starts_in_book_or_at_the_root(tmp_path, server_root):
    repo = copy_book(tmp_path)
    cm = jupytext.AsyncTextFileContentsManager(root_dir=str(repo / server_root))
    rel = "" if server_root == "book" else "book/"
    chapter = CHAPTERS[1]
    ipynb = json.loads((repo / "book" / f"{chapter}.ipynb").read_text())
    assert n_outputs(ipynb) > 0
    # the .py opens as the notebook, with the .ipynb's outputs
    nb = run(cm.get(f"{rel}{chapter}.py"))["content"]
    assert n_outputs(nb) == n_outputs(ipynb)
    # saving either file updates the other
    nb.cells[0].source += "\n\nA line added in JupyterLab."
    run(cm.save({"type": "notebook", "format": "json", "content": nb}, f"{rel}{chapter}.ipynb"))
    assert "# A line added in JupyterLab." in (repo / "book" / f"{chapter}.py").read_text()
    nb.cells[0].source += " And another, saved from the .py."
    run(cm.save({"type": "notebook", "format": "json", "content": nb}, f"{rel}{chapter}.py"))
    saved = json.loads((repo / "book" / f"{chapter}.ipynb").read_text())
    assert saved["cells"][0]["source"][-1].endswith("And another, saved from the .py.")
    assert n_outputs(saved) == n_outputs(ipynb)


def jupyterlab_metadata() -> dict:
    """What JupyterLab puts in a notebook's metadata once its kernel starts: the kernelspec
    from the installed spec, language_info from the kernel (ipykernel's, for this Python)."""
    import platform

    from ipykernel.ipkernel import IPythonKernel
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("python3")
    info = {**IPythonKernel.language_info, "version": platform.python_version()}
    return {"kernelspec": {"display_name": spec.display_name, "language": spec.language,
                           "name": "python3"}, "language_info": info}


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_opening_and_saving_a_chapter_changes_nothing(tmp_path, chapter):
    repo = copy_book(tmp_path)
    book = repo / "book"
    before = {p.name: p.read_bytes() for p in book.iterdir() if p.is_file()}
    cm = jupytext.AsyncTextFileContentsManager(root_dir=str(book))
    nb = run(cm.get(f"{chapter}.py"))["content"]
    nb.metadata.update(jupyterlab_metadata())
    run(cm.save({"type": "notebook", "format": "json", "content": nb}, f"{chapter}.py"))
    after = {p.name: p.read_bytes() for p in book.iterdir() if p.is_file()}
    assert after.keys() == before.keys()
    assert after[f"{chapter}.py"].decode() == before[f"{chapter}.py"].decode()
    old, new = (json.loads(d[f"{chapter}.ipynb"]) for d in (before, after))
    # the one thing that follows the reader's machine: the kernel's Python version
    old["metadata"]["language_info"]["version"] = new["metadata"]["language_info"]["version"]
    assert new == old
    if old["metadata"]["language_info"] == jupyterlab_metadata()["language_info"]:
        assert after[f"{chapter}.ipynb"] == before[f"{chapter}.ipynb"]   # byte for byte
