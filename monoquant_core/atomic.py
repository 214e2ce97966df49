"""Atomic outputs: a file or folder appears complete, or not at all.

Writes go to a temporary path next to the target and are renamed into place only when
complete, so a failed or killed write never leaves a partial output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable

from .errors import UsageError

__all__ = ["atomic_folder", "atomic_write", "check_output_path"]


def check_output_path(path: str, overwrite: bool = True) -> str:
    """Validate an output file path before any work; returns its absolute form."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise UsageError(
            f"output {path!r} is a directory", "give a file path, e.g. model.safetensors"
        )
    if not os.path.isdir(parent):
        raise UsageError(
            f"output directory {parent!r} does not exist",
            f"create it first (mkdir -p {parent}) or choose another output path",
        )
    if not overwrite and os.path.exists(path):
        raise UsageError(
            f"output {path!r} already exists", "pass --overwrite or choose another path"
        )
    return path


def atomic_write(path: str, write: Callable[[str], None], overwrite: bool = True) -> None:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` to ``path``; clean up on any failure."""
    path = check_output_path(path, overwrite)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path)
    )
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise _write_error(path, e) from e
    except BaseException:
        _remove(tmp)
        raise


def atomic_folder(dst: str, build: Callable[[str], None], overwrite: bool) -> None:
    """Call ``build(tmp_dir)`` then move ``tmp_dir`` to ``dst``; clean up on any failure.

    An existing ``dst`` (with ``overwrite``) is moved aside first and restored if the final
    rename fails.
    """
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=os.path.dirname(dst))
    try:
        build(tmp)
        _replace_folder(tmp, dst, overwrite)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(dst, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_folder(tmp: str, dst: str, overwrite: bool) -> None:
    if not os.path.exists(dst):
        os.rename(tmp, dst)
        return
    if not overwrite:
        raise UsageError(f"output {dst!r} already exists", "pass --overwrite")
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(dst))
    os.rmdir(old)
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_error(path: str, e: OSError) -> UsageError:
    return UsageError(
        f"cannot write {path!r}: {e.strerror or e}",
        "check free disk space and write permission of the output directory",
    )


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
