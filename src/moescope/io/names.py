"""Names that become one path component: arms, analysed models. A name read from a config, a run's JSON or
the command line is joined under a run or output directory; a separator, a leading dot ('..') or an
absolute path would put files outside it."""

from __future__ import annotations

import re

from moescope.errors import MoescopeError

# ASCII only: the same name must be the same directory on every filesystem a run is copied to
PATH_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
PATH_NAME_RULE = "1-64 of letters, digits, '-', '_' and '.', not starting with '.'"


def is_path_name(name: object) -> bool:
    """True for a string that is safe as one path component (PATH_NAME)."""
    return isinstance(name, str) and PATH_NAME.fullmatch(name) is not None


def check_path_name(name: object, what: str) -> str:
    """`name` unchanged when it is a safe path component; else one MoescopeError naming `what`."""
    if not is_path_name(name):
        raise MoescopeError(f"{what} {name!r} cannot name a directory: use {PATH_NAME_RULE}")
    return name  # type: ignore[return-value]
