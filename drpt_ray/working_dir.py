"""A job's working directory packed for the control plane (`drpt-ray submit --working-dir DIR`,
`Client.submit(spec, working_dir=DIR)`): a zip of DIR's files, which the server hands to Ray as the
job's runtime-env `working_dir`. The job then runs in Ray's copy of it: its modules import and its
relative paths resolve there.

Packed: every regular file under DIR, by its path relative to DIR. Skipped: EXCLUDED directories
(caches and version control, never what a job reads). A symlink is followed when it stays inside
DIR (the zip holds the file it names) and refused when it leads out of DIR: what ships is what the
directory holds, not whatever on the machine a link happens to reach.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

EXCLUDED = frozenset({"__pycache__", ".git"})
MAX_BYTES = 256 << 20  # the client's own guard (a home directory given by mistake); the server's limit is its own


def pack(directory: str | Path, max_bytes: int = MAX_BYTES) -> bytes:
    """The zip of `directory` (see the module docstring).

    Raises:
        ValueError: not a directory, a symlink out of it, or more than `max_bytes` of files.
    """
    root = Path(directory).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"working dir {directory}: not a directory")
    buf, total = io.BytesIO(), 0
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, strict_timestamps=False) as z:
        for path in _files(root):
            total += path.stat().st_size
            if total > max_bytes:
                raise ValueError(f"working dir {directory}: more than {max_bytes} bytes of files; ship code and "
                                 "small data, and read large data from the server's read roots")
            z.write(path, path.relative_to(root).as_posix())
    return buf.getvalue()


def _files(root: Path):
    """The files to pack, in a stable order; each directory once (a link back up is not walked again)."""
    seen: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = _inside(root, Path(dirpath))
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED)
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if _inside(root, path).is_file():  # a socket or a FIFO is no file to ship
                yield path


def _inside(root: Path, path: Path) -> Path:
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):  # a dangling link (OSError), a loop of links (RuntimeError in 3.11)
        raise ValueError(f"working dir {root}: {path} is a broken link or a loop of links") from None
    if not real.is_relative_to(root):
        raise ValueError(f"working dir {root}: {path} links to {real}, outside the directory; copy what it "
                         "names into the directory instead")
    return real
