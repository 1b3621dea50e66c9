"""Atomic file writes: a reader (or a crash) sees the old file or the new one, whole, never half."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    dest = Path(path)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".tmp-{dest.name}.")
    os.close(fd)
    # mkstemp makes the file 0600; the result should have the mode open() would give it (0666 less the umask)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only set it, which would
    race with threads creating files meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a file's bytes, read 8 MiB at a time (a multi-GB model never whole in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()
