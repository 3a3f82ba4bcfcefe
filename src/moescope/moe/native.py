"""The compiled grouped GEMM (csrc/grouped_gemm.cpp), built on first use with torch's JIT.

torch.utils.cpp_extension compiles the source once per torch version and caches the
library under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions); `make install`
builds it. Later imports only load it. It needs a C++ compiler and ninja, which a CPU
training machine usually has. Without them, or with MOESCOPE_NATIVE=0,
`grouped_kernels()` returns None and moescope runs the same GEMMs one after another
from Python: same values, slower on small experts.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "grouped_gemm.cpp"
ENV_SWITCH = "MOESCOPE_NATIVE"
STALE_LOCK_S = 600.0


def native_enabled() -> bool:
    """False when the user switched the compiled kernels off (MOESCOPE_NATIVE=0)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in {"0", "false", "no", "off"}


def _build_directory(torch_version: str) -> Path:
    """One cache per torch version: torch's own cache key covers sources and flags, not
    the torch the library was compiled against."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
    tag = f"moescope-torch{torch_version}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    path = Path(root) / tag
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home: build in the temporary directory instead
        path = Path(tempfile.gettempdir()) / "torch_extensions" / tag
        path.mkdir(parents=True, exist_ok=True)
    return path


def _clear_stale_lock(build_dir: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove a build lock left by a killed build; True if one was removed.

    torch's JIT guards a build with a lock file and waits on it forever; a build
    interrupted by Ctrl-C leaves it behind and every later import would hang. A build
    takes ~20 s on two cores, so a lock older than `max_age_s` is stale.
    """
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age_s:
        return False
    lock.unlink(missing_ok=True)
    log.warning("removed a stale build lock %s (%.0f s old)", lock, age)
    return True


@functools.cache
def _build() -> ModuleType | None:
    try:
        import torch
        from torch.utils.cpp_extension import load

        build_dir = _build_directory(torch.__version__)
        _clear_stale_lock(build_dir)
        log.info("loading moescope's grouped GEMM (built once per torch version, in %s)", build_dir)
        return load(
            name="moescope_grouped_gemm",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as exc:  # no compiler / ninja / headers: fall back, loudly once
        detail = str(exc).strip()
        detail = detail if len(detail) <= 400 else detail[:200] + " ... " + detail[-200:]
        warnings.warn(
            f"moescope: could not build the grouped GEMM from {SOURCE} ({type(exc).__name__}: {detail}); "
            f"experts run one by one instead (same results, slower). Set {ENV_SWITCH}=0 to skip the build.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def grouped_kernels() -> ModuleType | None:
    """The compiled module, or None when it is switched off or cannot be built."""
    return _build() if native_enabled() else None
