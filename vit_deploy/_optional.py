"""The packages of the `export` extra, imported only where they are needed.

The core install runs bundles (predict, check --golden, bench, info, quantize,
compile) without torch, as an edge box has it. A path that needs torch or another
export-only package ends with one line naming the extra, never a traceback.
"""
from __future__ import annotations

import importlib

from .errors import UserError

EXPORT_EXTRA = "pip install 'vit-deploy[export]'"
_NAMES = {"torch": "PyTorch"}


def require(module: str, what: str, alternative: str | None = None):
    """Import `module` (of the export extra) for `what`, or raise a UserError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        hint = f", or {alternative}" if alternative else ""
        raise UserError(f"{what} needs {_NAMES.get(module, module)}: {EXPORT_EXTRA}{hint}") from None


def require_torch(what: str, alternative: str | None = None):
    """torch, or one line saying that `what` needs the export extra."""
    return require("torch", what, alternative)


def missing_torch() -> str | None:
    """None when torch imports, else why not and what to install (for optional torch paths)."""
    try:
        importlib.import_module("torch")
    except ImportError:
        return f"PyTorch is not installed: {EXPORT_EXTRA}"
    return None
