"""The compiled grouped GEMM (csrc/grouped_gemm.cpp), built on first use with torch's JIT.

torch.utils.cpp_extension compiles the source once per torch version and caches the
library under $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions); `make install`
builds it. Later imports only load it. It needs a C++ compiler and ninja, which a CPU
training machine usually has. Without them, or with MOESCOPE_NATIVE=0,
`grouped_kernels()` returns None and moescope runs the same GEMMs one after another
from Python: the same values (bit for bit in float32, tested; float64 BLAS rounding can
differ in the last bits), slower on small experts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "grouped_gemm.cpp"
ENV_SWITCH = "MOESCOPE_NATIVE"


def native_enabled() -> bool:
    """False when the user switched the compiled kernels off (MOESCOPE_NATIVE=0)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in {"0", "false", "no", "off"}


def _build_directory(torch_version: str) -> Path:
    """One cache per torch version: torch's own cache key covers sources and flags, not
    the torch the library was compiled against. Falls back to a private directory under
    the temporary directory when the cache root cannot be created or written."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
    tag = f"moescope-torch{torch_version}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    path = Path(root) / tag
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    user = os.getuid() if hasattr(os, "getuid") else "user"
    private = Path(tempfile.gettempdir()) / f"moescope-extensions-{user}"
    private.mkdir(mode=0o700, exist_ok=True)
    path = private / tag
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def _exclusive_build(build_dir: Path):
    """Serialises moescope's builds and loads in `build_dir` across processes.

    torch's JIT guards a build with a `lock` file and waits on it with no timeout; a
    build killed with SIGKILL (or by the OOM killer) leaves the file behind and every
    later import would hang. Every moescope process takes this OS lock (released by the
    kernel when its holder dies) before calling torch, so a `lock` file found while
    holding it belongs to a dead build and is removed. Without fcntl (Windows) nothing
    is cleared.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(build_dir / "moescope.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        orphan = build_dir / "lock"
        if orphan.exists():
            orphan.unlink(missing_ok=True)
            log.warning("removed a build lock left by a killed build: %s", orphan)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.cache
def _build() -> ModuleType | None:
    try:
        import torch
        from torch.utils.cpp_extension import load

        build_dir = _build_directory(torch.__version__)
        log.info("loading moescope's grouped GEMM (built once per torch version, in %s)", build_dir)
        with _exclusive_build(build_dir):
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


def native_status() -> str:
    """Whether the compiled grouped GEMM serves this process's CPU MoE layers, without building it (for the
    provenance record): "off" (MOESCOPE_NATIVE=0), "loaded", "unavailable" (its build failed: experts run one
    by one, same results) or "not loaded yet" (no CPU MoE forward has needed it so far)."""
    if not native_enabled():
        return "off"
    if _build.cache_info().currsize == 0:
        return "not loaded yet"
    return "loaded" if _build() is not None else "unavailable"
