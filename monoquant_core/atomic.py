"""Atomic outputs: a file or folder appears complete, or not at all.

Writes go to a temporary path next to the target and are renamed into place only when
complete, so a failed or killed write never leaves a partial output. Without ``overwrite``
the final rename never replaces an output that appeared while this run was writing (another
process writing the same path): it is a no-replace rename, and the loser gets a one-line
"already exists" error.

Temporary names carry their owner: ``.NAME.monoquant-tmp-<pid>-<host>-<random>`` (``host``
is a short hash of the host name and pid namespace, so a folder shared between machines or
containers is safe). A run killed with ``kill -9`` cannot remove its temporary path, so every
write first scans the folder it writes into and removes the temporary paths whose process no
longer exists on this host (:func:`remove_stale_temps`), saying so in one line on stderr. The
safetensors writer's spool files follow the same pattern.

Outputs get the permissions of a normal ``open`` / ``mkdir``: ``0o666`` / ``0o777`` minus the
umask (never ``tempfile``'s private ``0o600`` / ``0o700``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
import sys
import zlib
from collections.abc import Callable
from functools import cache

from .errors import UsageError

__all__ = [
    "atomic_folder",
    "atomic_write",
    "check_folder",
    "check_output_path",
    "current_umask",
    "is_temp_name",
    "remove_stale_temps",
    "temp_tag",
]

#: ``.NAME.monoquant-tmp-<pid>-<host>-...`` or ``.monoquant-tmp-<pid>-<host>-...`` (spools)
_TEMP_RE = re.compile(r"^\.(?:.*\.)?monoquant-tmp-(\d{1,10})-([0-9a-f]{8})-")


@cache
def host_tag() -> str:
    """8 hex digits naming this host and pid namespace (a crc32 of the host name and, on Linux,
    the pid namespace: containers sharing a host name and a folder do not share pids)."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return f"{zlib.crc32(f'{socket.gethostname()}|{ns}'.encode('utf-8', 'replace')):08x}"


def temp_tag() -> str:
    """``monoquant-tmp-<pid>-<host>``: the part of a temporary name that names its owner."""
    return f"monoquant-tmp-{os.getpid()}-{host_tag()}"


def is_temp_name(name: str) -> bool:
    """True for the name of a temporary file or folder of a Mono Quant write (any owner)."""
    return _TEMP_RE.match(name) is not None


def _owner_gone(name: str) -> bool:
    """True when ``name`` is a temporary path of a process of this host that has ended."""
    m = _TEMP_RE.match(name)
    if m is None or m.group(2) != host_tag():
        return False
    pid = int(m.group(1))
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError, ValueError):  # exists (another user's), or not a pid
        return False
    return False


def remove_stale_temps(folder: str) -> list[str]:
    """Remove the temporary files and folders in ``folder`` left by ended (killed) processes of
    this host; say so on stderr in one line. Returns the removed names."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    removed = []
    for name in names:
        if not _owner_gone(name):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except FileNotFoundError:  # another run cleaned it at the same time
            continue
        except OSError:
            continue
        removed.append(name)
    if removed:
        pids = sorted({int(_TEMP_RE.match(n).group(1)) for n in removed})  # type: ignore[union-attr]
        shown = ", ".join(removed[:3]) + (
            f" and {len(removed) - 3} more" if len(removed) > 3 else ""
        )
        sys.stderr.write(
            f"monoquant: removed {len(removed)} temporary path(s) in {folder} left by killed "
            f"run(s) (pid {', '.join(map(str, pids))}): {shown}\n"
        )
        sys.stderr.flush()
    return removed


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: the classic read (briefly sets a umask)
    os.umask(mask)
    return mask


def check_output_path(path: str, overwrite: bool = True) -> str:
    """Validate an output file path before any work; returns its absolute form."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise UsageError(
            f"output {path!r} is a directory", "give a file path, e.g. model.safetensors"
        )
    check_folder(parent)
    if not overwrite and os.path.lexists(path):
        raise UsageError(
            f"output {path!r} already exists", "pass --overwrite or choose another path"
        )
    return path


def check_folder(parent: str) -> None:
    """``parent`` exists and this process may create files in it."""
    if not os.path.isdir(parent):
        raise UsageError(
            f"output directory {parent!r} does not exist",
            f"create it first (mkdir -p {parent}) or choose another output path",
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            f"cannot write to the output directory {parent!r} (permission denied or read-only)",
            "choose an output path in a writable directory, or fix its permissions",
        )


def _new_temp(target: str, folder: bool) -> str:
    """Create a fresh temporary file (mode 0600) or folder (0777 minus the umask) next to
    ``target``; returns its path."""
    parent, base = os.path.split(target)
    for _ in range(100):
        tmp = os.path.join(parent, f".{base}.{temp_tag()}-{secrets.token_hex(4)}")
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", target)  # pragma: no cover


def atomic_write(path: str, write: Callable[[str], None], overwrite: bool = True) -> None:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` to ``path``; clean up on any failure.

    Without ``overwrite`` the rename never replaces a file that appeared meanwhile.
    """
    path = check_output_path(path, overwrite)
    remove_stale_temps(os.path.dirname(path))
    try:
        tmp = _new_temp(path, folder=False)
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_noreplace(tmp, path, is_dir=False)
        _fsync_dir(os.path.dirname(path))
    except FileExistsError:
        _remove(tmp)
        raise _exists_error(path) from None
    except OSError as e:
        _remove(tmp)
        raise _write_error(path, e) from e
    except BaseException:
        _remove(tmp)
        raise


def atomic_folder(dst: str, build: Callable[[str], None], overwrite: bool) -> None:
    """Call ``build(tmp_dir)`` then move ``tmp_dir`` to ``dst``; clean up on any failure.

    An existing ``dst`` (with ``overwrite``) is moved aside first and restored if the final
    rename fails. Without ``overwrite`` a folder that appeared meanwhile is never replaced.
    """
    dst = os.path.abspath(os.fspath(dst))
    check_folder(os.path.dirname(dst))
    remove_stale_temps(os.path.dirname(dst))
    try:
        tmp = _new_temp(dst, folder=True)
    except OSError as e:
        raise _write_error(dst, e) from e
    try:
        build(tmp)
        _replace_folder(tmp, dst, overwrite)
        _fsync_dir(os.path.dirname(dst))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(dst, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_folder(tmp: str, dst: str, overwrite: bool) -> None:
    try:
        _rename_noreplace(tmp, dst, is_dir=True)
        return
    except FileExistsError:
        if not overwrite:
            raise _exists_error(dst) from None
    old = os.path.join(
        os.path.dirname(dst), f".{os.path.basename(dst)}.{temp_tag()}-{secrets.token_hex(4)}"
    )
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- no-replace rename

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


@cache
def _libc_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # no glibc >= 2.28 (e.g. musl): use the fallback
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _renameat2(src: str, dst: str) -> bool:
    """``rename(src, dst)`` that fails with FileExistsError if ``dst`` exists (Linux
    ``renameat2(RENAME_NOREPLACE)``); False where the OS or file system cannot do it."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), dst)  # EEXIST / ENOTEMPTY -> FileExistsError below


def _rename_noreplace(src: str, dst: str, is_dir: bool) -> None:
    """Move ``src`` to ``dst``; FileExistsError (never a replacement) when ``dst`` exists."""
    try:
        if _renameat2(src, dst):
            return
    except OSError as e:
        if e.errno == errno.ENOTEMPTY:
            raise FileExistsError(errno.EEXIST, "File exists", dst) from None
        raise
    # Fallback: claim the name atomically (O_EXCL / mkdir fail if it exists), then replace the
    # placeholder this process just created.
    if is_dir:
        os.mkdir(dst, 0o700)
    else:
        os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        os.rename(src, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            (os.rmdir if is_dir else os.remove)(dst)
        raise


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exists_error(path: str) -> UsageError:
    return UsageError(
        f"output {path!r} already exists (it appeared while this run was writing: another "
        "process wrote it)",
        "pass --overwrite or choose another path",
    )


def _write_error(path: str, e: OSError) -> UsageError:
    return UsageError(
        f"cannot write {path!r}: {e.strerror or e}",
        "check free disk space and write permission of the output directory",
    )


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
