"""Publishing a finished version folder into a model repository in one step.

A version is built in a hidden staging folder next to its target and renamed into place, so a
server scanning the repository sees either the old version or the new one, never a half-written
folder; `--force` swaps the two atomically where Linux's renameat2 allows.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from pathlib import Path

from core.errors import UserError


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def publish(staging: Path, target: Path, force: bool) -> None:
    """Rename the finished `staging` folder to `target`; with `force`, replace an existing target."""
    if not target.exists():
        os.rename(staging, target)
        return
    if not force:
        raise UserError(f"{target}: version exists; pass --force to replace it")
    if exchange(staging, target):  # staging now holds the old version
        shutil.rmtree(staging)
        return
    retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".retired-{target.name}-"))
    os.rename(target, retired / "old")
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(retired / "old", target)
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def make_readable(folder: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; a model server (e.g. Triton) may run as another user."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def replace_file(source: Path, target: Path) -> None:
    """Copy `source` over `target` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
