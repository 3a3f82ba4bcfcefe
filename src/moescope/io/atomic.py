"""Atomic file and directory writes: a crash never leaves a half-written artifact.

Everything is written to a temporary sibling path and renamed into place at the
end (rename is atomic on POSIX within one filesystem). A temporary path is named
`.NAME.PID-HOST.XXXXXXXX.tmp` (NAME the target's, PID the writer's, HOST a digest of
its machine's name), so that the next write of the same target can remove what a killed
writer left (`remove_stale_temporaries`) without touching a live one's, including a
writer on another machine of a shared filesystem (a sweep's workers), whose PID means
nothing here; the renamed result gets the permissions an ordinary write would have had
(umask), not tempfile's private 0600 / 0700.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once: os.umask can only be read by setting it


_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def temporary_prefix(target: Path) -> str:
    """The start of every temporary name of `target` this process makes (see remove_stale_temporaries)."""
    return f".{target.name}.{os.getpid()}-{_HOST}."


def _stale_pattern(target: Path) -> re.Pattern[str]:
    """Temporary names of `target` (with the writer's PID and host; older moescope wrote no host, or
    neither) and its trash."""
    name = re.escape(target.name)
    return re.compile(rf"\.{name}\.(?:(?P<pid>\d+)(?:-(?P<host>[0-9a-f]{{8}}))?\.)?[a-z0-9_]{{8}}\.tmp|\.{name}\.old")


def _live_writer(match: re.Match[str]) -> bool:
    """True when the temporary may belong to a writer still running: this process, a live process of
    this machine, or any writer of another machine (whose process table cannot be read from here)."""
    if not match["pid"]:
        return False
    if match["host"] and match["host"] != _HOST:
        return True
    pid = int(match["pid"])
    return pid == os.getpid() or _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Delete what killed writes of `target` left beside it: its `.NAME.PID.*.tmp` whose writer process
    is gone (or that name no PID), and `.NAME.old` (a replaced directory not yet deleted). Nothing of
    another name, nothing of a live writer on this machine and nothing written from another machine is
    touched. Returns what was removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern, removed = _stale_pattern(target), []
    for p in sorted(target.parent.iterdir()):
        match = pattern.fullmatch(p.name)
        if match is None or _live_writer(match):
            continue
        _remove(p)
        removed.append(p)
    return removed


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def plain_file_mode() -> int:
    """The permissions a plain create gives a file under this process's umask (mkstemp gives 0600)."""
    return 0o666 & ~_UMASK


def new_temporary(path: Path) -> tuple[int, str]:
    """(open fd, name) of a fresh temporary beside `path`, named so that `remove_stale_temporaries` knows
    it and with the permissions a plain create would give; stale temporaries of `path` are removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, plain_file_mode())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Open a temporary file beside ``path`` for binary writing; on success it is fsynced and renamed
    onto ``path`` (and the directory synced), on any error removed: readers never see a partial file."""
    path = Path(path)
    fd, tmp = new_temporary(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _raise_naming(exc, path)
        raise
    fsync_directory(path.parent)  # the rename itself survives a power loss only once the directory is synced


# numpy reports a write the file system cut short as "N requested and M written", with no errno
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
_WRITE_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG", "EIO", "EROFS") if hasattr(errno, n))


def _raise_naming(exc: BaseException, target: Path) -> None:
    """For a failed write that names no file (a full disk, a quota, a file-size limit), raise the same
    error naming `target`, so that the one line the CLI prints says what could not be written; any other
    error (a socket's, say, raised by the caller's own work inside atomic_directory): return."""
    if not isinstance(exc, OSError) or exc.filename is not None:
        return
    if exc.errno in _WRITE_ERRNOS:
        raise OSError(exc.errno, exc.strerror, str(target)) from exc
    if exc.errno is None and _SHORT_WRITE.fullmatch(str(exc)):  # numpy's tofile / save: no errno, no file
        raise OSError(f"{target}: {exc}, a short write (is the disk full?)") from exc


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_file(path) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """`obj` as JSON (NaN and infinities written as null: strict JSON that browsers and other tools read)."""
    from moescope.io.jsonfile import json_ready

    text = json.dumps(json_ready(obj), indent=indent, sort_keys=False, default=_json_default, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and Paths show up in metrics and configs.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def fsync_directory(path: str | Path) -> None:
    """fsync a directory, so that the names created or renamed in it are on disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under `root` (and `root` itself)."""
    root = Path(root)
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(dirpath)


def remove_orphaned_temporaries(parent: str | Path) -> list[Path]:
    """Delete what a killed `atomic_directory` / `atomic_write_bytes` left in `parent`: `.NAME.*.tmp`
    (an unfinished write) and `.NAME.old` (a replaced directory not yet deleted). Call it only while
    no other process writes into `parent` (e.g. under the run-directory lock). Returns what was removed."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for p in sorted(parent.iterdir()):
        if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old")):
            _remove(p)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_directory(final: str | Path, *, overwrite: bool = False, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `final` only if the block succeeds.

    If `final` exists and `overwrite` is False, the caller must have decided what
    to do before (e.g. refuse a different build); here it is replaced only when
    `overwrite` is True, and only after the new one is complete. `durable`: fsync
    every file and directory before the rename and the parent after it, so that a
    power loss cannot leave a renamed directory whose files are empty. What an
    earlier, killed write of `final` left beside it is removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(final), suffix=".tmp", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        if durable:
            fsync_tree(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_naming(exc, final)
        raise
    if final.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{final} already exists")
        trash = final.with_name(f".{final.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if durable:
        fsync_directory(final.parent)
