"""vit-deploy: a Vision Transformer from a PyTorch checkpoint to a verified edge engine.

The public API is imported lazily, so `import vit_deploy` loads neither torch
nor any runtime: a missing runtime is reported when it is asked for.
"""
from __future__ import annotations

__version__ = "0.1.0"

_API = {
    "build_model": "vit_deploy.models",
    "list_models": "vit_deploy.zoo_table",
    "save_weights": "vit_deploy.weights",
    "export": "vit_deploy.pipeline",
    "export_onnx": "vit_deploy.onnx_export",
    "quantize": "vit_deploy.quantize",
    "compile_bundle": "vit_deploy.compile",
    "check": "vit_deploy.parity",
    "bench": "vit_deploy.bench",
    "open_runner": "vit_deploy.backends",
    "Bundle": "vit_deploy.bundle",
    "UserError": "vit_deploy.errors",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'vit_deploy' has no attribute {name!r}")
