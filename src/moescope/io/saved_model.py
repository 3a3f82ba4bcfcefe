"""A model directory moescope saved (a stage's final/, a snapshot, any save_moe_model output), loaded as
a user hands it over: checked against its sha256 manifest when it has one (a stage's final/ does), and
a config.json whose values have the wrong type is one error naming that file, not a traceback."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from moescope.errors import MoescopeError
from moescope.io.manifest import MANIFEST_NAME, verify_manifest


def _strict_config_errors() -> tuple[type[BaseException], ...]:
    """What transformers' configs (strict dataclasses since huggingface_hub 1.0) raise for a value of the
    wrong type; older versions raise TypeError / ValueError, as they still do for ranges."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


STRICT_CONFIG_ERRORS = _strict_config_errors()


def config_error(config_path: Path | str, exc: BaseException) -> MoescopeError:
    """One line naming the config file and what is wrong in it (transformers' message spans lines)."""
    return MoescopeError(f"{config_path}: unusable model config ({' '.join(str(exc).split()) or type(exc).__name__})")


def verify_saved_model(directory: str | Path, manifest_sha256: str | None = None) -> None:
    """Raise MoescopeError naming the file if `directory` has a manifest and a file differs from it
    (changed, truncated, added or missing since training wrote it). With `manifest_sha256` (what the
    stage's summary.json recorded when it finished) the manifest itself must be there and unchanged:
    a final/ whose manifest was deleted is not taken for one from before manifests existed."""
    from moescope.io.provenance import sha256_file
    from moescope.moe.hf_model import CONFIG_NAME, WEIGHTS_NAME

    directory = Path(directory)
    manifest = directory / MANIFEST_NAME
    if manifest_sha256 is not None:
        if not manifest.is_file():
            raise MoescopeError(f"{manifest} is missing, but the stage's summary.json recorded one")
        if sha256_file(manifest) != manifest_sha256:
            raise MoescopeError(f"{manifest} differs from the one the stage's summary.json recorded")
    if manifest.is_file():
        verify_manifest(directory, (WEIGHTS_NAME, CONFIG_NAME))


def recorded_manifest_sha256(directory: str | Path) -> str | None:
    """The manifest digest the stage's summary.json recorded for `directory` when it is a stage's final/
    (None: not a final/, no summary.json, or a summary written before summaries recorded it). A summary.json
    that is there but unreadable, or records something other than a digest, is one error naming it: a
    damaged summary must not let a final/ whose manifest is also gone pass as one from before manifests."""
    from moescope.io.jsonfile import read_json_object

    directory = Path(directory)
    summary = directory.parent / "summary.json"
    if directory.name != "final" or not summary.exists():
        return None
    value = read_json_object(summary).get("final_manifest_sha256")
    if value is not None and not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)):
        raise MoescopeError(f"{summary}: 'final_manifest_sha256' must be a sha256 hex digest, got {value!r:.80}")
    return value


def load_saved_model(directory: str | Path, *, device: Any = None) -> Any:
    """load_moe_model after `verify_saved_model` (a wrong-typed config.json is one MoescopeError naming it:
    moe/hf_model.py reads the config through `config_error`)."""
    from moescope.moe.hf_model import load_moe_model

    verify_saved_model(directory, recorded_manifest_sha256(directory))
    return load_moe_model(directory, device=device)
