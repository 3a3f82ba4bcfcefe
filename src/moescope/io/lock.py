"""One process per run directory: an exclusive, non-blocking file lock plus the holder's PID beside it.

Two processes training into one directory would interleave their metrics and overwrite each
other's checkpoints, so a second one is refused at once (never queued) with the holder's PID.
The lock is the `filelock` library's (flock on POSIX): the kernel drops it when its process
dies, even by SIGKILL, so a stale lock file never blocks a later resume; a stale PID file is
simply overwritten by the next holder. Both files are removed on release.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from moescope.errors import MoescopeError
from moescope.io.atomic import atomic_write_text

LOCK_NAME = ".moescope.lock"
PID_NAME = ".moescope.lock.pid"
LOCK_FILES = frozenset({LOCK_NAME, PID_NAME})


def holder_pid(directory: str | Path) -> str:
    """The PID recorded beside the lock of `directory` ('unknown' while it is being written)."""
    try:
        text = (Path(directory) / PID_NAME).read_text(encoding="utf-8").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def run_directory_lock(directory: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock of `directory` (created if missing) for the block.

    Raises MoescopeError naming the holder's PID if another process (or another lock object
    of this process) holds it.
    """
    from filelock import FileLock, Timeout

    directory = Path(directory)
    created = [p for p in (directory, *directory.parents) if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / LOCK_NAME), timeout=0, is_singleton=False, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _remove_if_empty(created)
        raise MoescopeError(
            f"{directory} is in use by process {holder_pid(directory)} (lock {directory / LOCK_NAME}); "
            f"wait for it to finish or stop it before training, resuming or analysing here"
        ) from None
    try:
        atomic_write_text(directory / PID_NAME, f"{os.getpid()}\n")
        yield directory
    finally:
        with contextlib.suppress(OSError):
            (directory / PID_NAME).unlink()
        with contextlib.suppress(OSError):
            # unlinked while still held: a peer that opened the old inode finds, once it has flock'ed
            # it, that the path no longer names that inode, and filelock makes it retry on the new one
            (directory / LOCK_NAME).unlink()
        lock.release()
        _remove_if_empty(created)  # a run refused before writing anything leaves no trace


def _remove_if_empty(created: list[Path]) -> None:
    for p in created:  # deepest first
        with contextlib.suppress(OSError):
            p.rmdir()


def is_empty_ignoring_lock(directory: str | Path) -> bool:
    """True when `directory` is missing or holds nothing but its lock files."""
    directory = Path(directory)
    return not directory.exists() or all(_is_lock_file(p.name) for p in directory.iterdir())


def _is_lock_file(name: str) -> bool:
    # includes the PID file's temporary name while atomic_write_text writes it
    return name in LOCK_FILES or (name.startswith(f".{PID_NAME}.") and name.endswith(".tmp"))
