"""The one exception type the CLI turns into a one-line error and a non-zero exit."""

import sys


class MoescopeError(Exception):
    """A user-facing error: bad input, a missing file, a mismatched checkpoint.

    The message must name the offending thing (file, value, key) so that the
    one line the CLI prints is enough to fix it.
    """


def first_line(exc: BaseException) -> str:
    """An exception's first non-empty line, or its type's name (library messages run to paragraphs,
    and the CLI prints one line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_out_of_memory(exc: BaseException) -> bool:
    """numpy's / Python's MemoryError, torch's (a CUDA) OutOfMemoryError, imported only if torch is, or
    torch's CPU allocator failing (a plain RuntimeError: a model too large for the machine's memory)."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return oom is not None and isinstance(exc, oom)
