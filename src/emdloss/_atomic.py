"""Atomic file writes: a temporary file in the target's folder, fsync'ed, then renamed into place.

``os.replace`` is atomic on POSIX, so a reader (or a run killed mid-write) sees the old file or the new one,
never half of one. The file ends with the permissions ``open`` would give it (``0o666 & ~umask``), not the
private 0600 of the temporary file. Used by ``Tree.save`` and by every experiment and benchmark output.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], make_parents: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsync'ed and renamed onto ``path``."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _new_file_mode() -> int:
    """The permissions ``open`` gives a new file under the current umask (``0o666 & ~umask``)."""
    mask = os.umask(0)  # the only portable way to read the umask is to set it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def write_text(path: str | os.PathLike[str], text: str, make_parents: bool = True) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically."""
    with atomic_path(path, make_parents) as tmp:
        tmp.write_text(text, encoding="utf-8")
