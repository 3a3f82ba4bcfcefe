"""The sweep's process pool: a worker whose sweep process is SIGKILLed stops and exits (no orphan)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process states in /proc")

# The "sweep process": opens the sweep's pool with one worker, starts a long unit in it and waits to be
# killed. How the unit meets the watchdog's SIGTERM is the parameter:
#   default   - SIGTERM's default action ends it (a worker analysing)
#   interrupt - SIGTERM raises in the unit, which ends (a trainer saving its checkpoint, then stopping);
#               the long grace shows the worker exits when the unit ends, not when the grace runs out
#   ignore    - SIGTERM changes nothing (a unit stuck in a write): the grace's forced exit ends it
MIDDLE = """
import signal, sys, time
from moescope.sweep.runner import _pool_unit, process_pool
from test_sweep_workers import announce_then_sleep

how, started = sys.argv[1], sys.argv[2]
pool = process_pool(1, grace_s=1.0 if how == "ignore" else 60.0)
if how != "default":
    handler = signal.SIG_IGN if how == "ignore" else signal.default_int_handler
    pool.submit(signal.signal, signal.SIGTERM, handler).result()
pool.submit(_pool_unit, announce_then_sleep, started)
time.sleep(600)
"""


def announce_then_sleep(started: str) -> None:
    """The long unit: writes the worker's pid to `started` (whole, by a rename), then sleeps."""
    Path(started + ".tmp").write_text(str(os.getpid()))
    os.replace(started + ".tmp", started)
    time.sleep(600)


def _wait_for(condition, what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {seconds:.0f} s")
        time.sleep(0.1)


def _running(pid: int) -> bool:
    """Alive and not a zombie (pid 1 in a container may never reap an orphan that exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("how", ["default", "interrupt", "ignore"])
def test_a_pool_worker_exits_when_the_sweep_process_is_killed(how: str, tmp_path: Path) -> None:
    started = tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE, how, str(started)], env=env)
    try:
        _wait_for(started.is_file, "no unit started")
    finally:
        middle.kill()  # SIGKILL: no handler, no atexit, no pool shutdown
        middle.wait()
    worker = int(started.read_text())
    try:
        _wait_for(lambda: not _running(worker), f"pool worker {worker} still running after its sweep process died")
    finally:
        if _running(worker):
            os.kill(worker, signal.SIGKILL)
