"""Process-level settings for long CPU runs, and the process's own memory readings.

`keep_freed_memory` is orchestration (called by the CLI, never by library code); the
/proc readings below serve the trainer's per-stage peak memory (`reset_peak_memory`,
`peak_memory_mb`) and the benchmarks; `catch_stop_signals` lets the trainer stop at a step
boundary (with a checkpoint) on SIGINT/SIGTERM, and an experiment stop between its stages;
`exit_with_parent` ends a pool worker whose parent process died.

glibc hands every freed block above its mmap threshold (at most 32 MB, adjusted on the
fly) back to the kernel, so a training step's large temporaries (the [16, 128, 4096]
logits alone are 33 MB) would be faulted in again page by page on every step, costing
system time on every step. Raising the mmap and trim thresholds with mallopt is the
standard fix short of swapping in jemalloc/tcmalloc, which would add a native dependency.
Peak memory is unchanged: the heap keeps what the process already used. The measured
effect is in DEVELOPERS.md ("Measured once").
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30


def keep_freed_memory(limit_bytes: int = KEEP_BYTES) -> bool:
    """Keep freed blocks up to `limit_bytes` in the heap (glibc on Linux); True if applied."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, limit_bytes)) and bool(mallopt(M_TRIM_THRESHOLD, limit_bytes))
    if not ok:
        log.debug("mallopt refused the thresholds; keeping the allocator's defaults")
    return ok


def proc_status_mb(key: str) -> float | None:
    """One memory line of /proc/self/status ("VmRSS", "VmHWM", ...) in MiB; None where there is none."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def reset_resident_peak() -> bool:
    """Reset this process's resident high-water mark (VmHWM) to its current RSS (Linux,
    /proc/self/clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return proc_status_mb("VmHWM") is not None


def reset_peak_memory() -> bool:
    """Start a new peak-memory window (one per training stage): the arms of an experiment run one
    after another in one process, and a process-wide peak would hand every later arm the largest
    peak of the stages before it. Resets CUDA's peak counter and, on Linux, VmHWM (via
    /proc/self/clear_refs) to the current RSS: a stage's peak still includes what is resident
    when it starts (memory the allocator kept from earlier stages), never an earlier stage's
    transient peak. Returns False when the RSS peak cannot be reset here (then `peak_memory_mb`
    reports the process-wide peak and says so)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return reset_resident_peak()


def peak_memory_mb(stage_scoped: bool = False) -> dict[str, Any]:
    """Peak resident memory (and CUDA peak) since the last `reset_peak_memory`, in MiB.

    `peak_rss_scope` says what the RSS peak covers: "stage" when the window was reset for this
    stage, "process" otherwise (ru_maxrss, the whole process's life)."""
    import resource

    import torch

    hwm = proc_status_mb("VmHWM") if stage_scoped else None
    if hwm is not None:
        out: dict[str, Any] = {"peak_rss_mb": hwm, "peak_rss_scope": "stage"}
    else:
        out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,  # Linux: KiB
               "peak_rss_scope": "process"}
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class StopSignal:
    """The SIGINT/SIGTERM caught inside `catch_stop_signals` (`signum`, None while none arrived)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _catch(self, signum, frame) -> None:  # noqa: ARG002
        self.signum = signum

    @property
    def name(self) -> str | None:
        """"SIGTERM", "SIGINT", or None while no signal arrived."""
        return signal.Signals(self.signum).name if self.signum is not None else None


_ACTIVE: StopSignal | None = None  # the main thread's outermost open block; nested blocks share it


@contextlib.contextmanager
def catch_stop_signals() -> Iterator[StopSignal]:
    """Within the block, SIGINT and SIGTERM only set `.signum`, so a training loop can save a
    checkpoint and stop at the next step boundary; the previous handlers are restored on exit.

    A block opened inside another (each stage's loop inside an experiment) shares the outer block's
    StopSignal and handlers: a signal that arrives while one stage finishes, or between two stages,
    stays set until the outer block ends, so the next check stops the run instead of losing it.
    Only the main thread can install handlers: elsewhere the block runs without them."""
    global _ACTIVE
    if threading.current_thread() is not threading.main_thread():
        yield StopSignal()
        return
    if _ACTIVE is not None:
        yield _ACTIVE
        return
    caught = StopSignal()
    handlers = {sig: signal.signal(sig, caught._catch) for sig in (signal.SIGINT, signal.SIGTERM)}
    _ACTIVE = caught
    try:
        yield caught
    finally:
        _ACTIVE = None
        for sig, old in handlers.items():
            signal.signal(sig, old)


ORPHAN_GRACE_S = 60.0  # from the SIGTERM to a forced exit: a step, an evaluation and a checkpoint fit in it
ORPHAN_EXIT_CODE = 128 + signal.SIGTERM
_WATCHED_PARENT: int | None = None  # the parent pid `exit_with_parent` watches in this process


def exit_with_parent(parent_pid: int, poll_s: float = 0.5, grace_s: float = ORPHAN_GRACE_S) -> None:
    """Worker initializer: once `parent_pid` is no longer this process's parent (it died, even by
    SIGKILL, and the worker was reparented), SIGTERM this process, so a training stage saves its
    interrupt checkpoint at the next step boundary (anywhere else SIGTERM's default action ends the
    process), and `os._exit` after `grace_s` at the latest: a dead pool's queue would otherwise keep
    the worker waiting forever. Polls getppid() from a daemon thread (portable, and unlike Linux's
    PR_SET_PDEATHSIG it watches the parent process, not the thread that started the worker)."""
    global _WATCHED_PARENT
    _WATCHED_PARENT = parent_pid
    threading.Thread(target=_watch_parent, args=(parent_pid, poll_s, grace_s), name="moescope-parent-watch",
                     daemon=True).start()


def orphaned() -> bool:
    """Whether the parent that `exit_with_parent` watches in this process has died."""
    return _WATCHED_PARENT is not None and os.getppid() != _WATCHED_PARENT


def _watch_parent(parent_pid: int, poll_s: float, grace_s: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    log.warning("parent process %d is gone: stopping worker %d (at most %.0f s)", parent_pid, os.getpid(), grace_s)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os._exit(ORPHAN_EXIT_CODE)
