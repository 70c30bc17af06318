"""Reading a file that a user named: model files (export.py) and tokenizer files (tokenizer.py).

    size, head = read_regular_file(path, ModelFileError, "model file", n=256)

A path may name a FIFO (opening it would wait for a writer forever), a directory, or a device
such as /dev/zero (reading it never ends). So: open without blocking, check that it is a regular
file, and only then read. Every failure is the caller's error type, naming the file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def file_kind(mode: int) -> str:
    """What a non-regular file is, in the words the C library uses."""
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a device or socket")


def read_regular_file(path: str | Path, error: type[Exception], what: str,
                      n: int | None = None, max_size: int | None = None) -> tuple[int, bytes]:
    """(file size, its first `n` bytes, or all of them when n is None) of the regular file
    `path`; `error(message)` is raised for anything else, the message naming `path` and `what`
    it was meant to be. A file larger than `max_size` is refused before it is read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: not a regular file ({file_kind(st.st_mode)})")
        if max_size is not None and st.st_size > max_size:
            raise error(f"{path}: {st.st_size} bytes is too large for a {what} "
                        f"(at most {max_size})")
        want = st.st_size if n is None else min(n, st.st_size)
        chunks, got = [], 0
        while got < want:   # pread may return less than asked
            chunk = os.pread(fd, want - got, got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        data = b"".join(chunks)
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from e
    finally:
        os.close(fd)
    if len(data) != want:
        raise error(f"{path}: read {len(data)} bytes of {want}: the file shrank")
    return st.st_size, data
