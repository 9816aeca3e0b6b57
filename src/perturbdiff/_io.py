"""Atomic writes: a temp file in the target's folder, fsync, then rename, so a crash never leaves half a file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then atomically move the temp file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the user's usual permissions
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def current_umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    def _w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic_write(path, _w)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def check_writable(path: str | Path, *, folder: bool = False, need_bytes: int = 0) -> Path:
    """Before any work: ``path`` (a file, or a folder with ``folder=True``) can be written and its disk holds
    ``need_bytes`` more; one clear OutputError otherwise, and nothing left behind but the folder itself."""
    from perturbdiff._errors import OutputError

    path = Path(path)
    where = path if folder else path.parent
    if path.exists() and folder != path.is_dir():
        raise OutputError(f"{path} exists and is {'a file' if folder else 'a folder'}, not "
                          f"{'a folder' if folder else 'a file'}")
    try:
        where.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=where, prefix=".perturbdiff-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write to {where}: {e.strerror or e}") from None
    if not folder and path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"cannot write to {path}: permission denied")
    free = shutil.disk_usage(where).free
    if free < need_bytes:
        raise OutputError(f"not enough free disk space in {where}: {free / 2**20:.0f} MiB free, about "
                          f"{need_bytes / 2**20:.0f} MiB needed")
    return path


def clean_temp_files(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Remove the temp files an interrupted :func:`atomic_write` of ``names`` left in ``folder``."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
