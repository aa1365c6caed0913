"""Versions of the tools that make an artifact (recorded in the manifest and cache keys)."""
from __future__ import annotations

import hashlib
import json
from importlib import metadata


def version_of(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def tool_versions(*dists: str) -> dict:
    from . import __version__
    out = {"vit-deploy": __version__}
    out.update({d: version_of(d) for d in dists})
    return out


def cache_key(**parts) -> str:
    """A stable hash of everything a stage's output depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
