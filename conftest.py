"""pytest, for tests/ and the notebooks in book/ alike: the book's artifacts go to a directory of
the session's own ($BABYLLAMA_OUT, see babyllama.book), never to the out/ that `make run` made;
the chapters' kernels inherit it. Removed at the end unless it was given."""

from __future__ import annotations

import os
import shutil
import tempfile

_OWN = None
if not os.environ.get("BABYLLAMA_OUT"):
    _OWN = tempfile.mkdtemp(prefix="babyllama-test-out-")
    os.environ["BABYLLAMA_OUT"] = _OWN


def pytest_unconfigure(config) -> None:
    if _OWN:
        shutil.rmtree(_OWN, ignore_errors=True)
