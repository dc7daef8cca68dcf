"""The tmerge cache: where converted weights and trained probes are kept, and how a cached state
dict is written and read back intact (a sha256 checksum, written last, vouches for the file)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .._io import atomic_paths
from .hashing import file_sha256

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where tmerge caches converted weights and probes: $TMERGE_CACHE_DIR, else the user cache dir."""
    override = os.environ.get("TMERGE_CACHE_DIR")
    if override:
        return Path(override)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("tmerge"))


def read_cached_state(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The state dict and metadata cached at ``path`` (safetensors), or None when it is missing
    or does not match its checksum (then it is converted again)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    checksum = path.with_suffix(".sha256")
    if not (path.is_file() and checksum.is_file()):
        return None
    if checksum.read_text().strip() != file_sha256(path):
        log.warning("cached weights %s are corrupt; converting again", path)
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    return load_file(str(path)), meta


def write_cached_state(state: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    """Write atomically, checksum last, so a torn write is never trusted."""
    from safetensors.torch import save_file

    try:
        with atomic_paths([path], mkdir=True) as (tmp,):
            save_file(state, str(tmp), metadata=meta)
        with atomic_paths([path.with_suffix(".sha256")]) as (tmp,):
            tmp.write_text(file_sha256(path) + "\n")
    except OSError as e:  # a read-only cache only costs a conversion next time
        log.warning("could not cache converted weights in %s: %s", path.parent, e)
