"""Write-to-temp-then-rename, so no half-written file ever stands under its final name; file hashes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from pathlib import Path
from typing import Iterator

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})  # no space left; disk quota exceeded


class DiskFullError(OSError):
    """The disk (or the user's quota) filled up while a file was written; the message names the file."""


def disk_full_cause(err: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError behind ``err`` (itself or in its chain), if any.

    h5py, PIL and pandas raise it directly; torch.save into a file object raises a RuntimeError whose
    context is the OSError of the failed write.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    A full disk while writing becomes a DiskFullError naming ``path`` (the library's own message
    names the hidden temporary file and rarely says "disk full" plainly).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    except Exception as err:
        full = disk_full_cause(err)
        if full is None or isinstance(err, DiskFullError):  # not a full disk, or named by an inner atomic_path
            raise
        raise DiskFullError(
            full.errno,
            f"{final}: disk full while writing this file ({os.strerror(full.errno)}); nothing was left under "
            f"this name. Free space on the disk holding {final.parent} (or raise your quota) and rerun.",
        ) from err
    finally:
        if tmp.exists():
            tmp.unlink()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
