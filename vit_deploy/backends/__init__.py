"""One small interface per runtime.

Each backend module provides:
    RUNTIME              its name (and the pip distribution to check)
    available() -> str | None      None when usable, else why not and what to install
    compile(onnx_path, staging, precision, options) -> (files, extras)
                         build its artifact from an ONNX file (torch has none)
    open(path, artifact, options) -> Runner
A Runner maps a float32 NCHW batch (1 .. max_batch) to float32 logits and is a
context manager. Runtimes are imported only when asked for.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from ..errors import UserError

MODULES = {
    "torch": "vit_deploy.backends.torch_backend",
    "onnx": "vit_deploy.backends.onnxruntime_backend",        # the portable ONNX files, run by ORT
    "onnxruntime": "vit_deploy.backends.onnxruntime_backend",
    "openvino": "vit_deploy.backends.openvino_backend",
    "tensorrt": "vit_deploy.backends.tensorrt_backend",
}
INSTEAD = {"tensorrt": "use --target openvino or onnxruntime on a machine without an NVIDIA GPU"}


def backend(name: str):
    if name not in MODULES:
        raise UserError(f"unknown backend '{name}': choose from {', '.join(MODULES)}")
    return importlib.import_module(MODULES[name])


def require_runtimes(runtimes, skip_missing: bool = False) -> tuple[tuple[str, ...], list[dict]]:
    """Check that each runtime is usable before any work starts.

    Missing ones end the run with one line naming them, or with skip_missing
    (--target all) are left out and reported."""
    ok, skipped = [], []
    for r in runtimes:
        why = backend(r).available()
        if why is None:
            ok.append(r)
        elif skip_missing:
            skipped.append({"runtime": r, "reason": why})
        else:
            hint = f"; {INSTEAD[r]}" if r in INSTEAD else ""
            raise UserError(f"{why}{hint}")
    return tuple(ok), skipped


class Runner:
    """Base: batch-size check and context management."""

    name = "runner"

    def __init__(self, max_batch: int, img_size: int):
        self.max_batch, self.img_size = max_batch, img_size

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != (3, self.img_size, self.img_size):
            raise UserError(f"{self.name}: expects images of shape [batch, 3, {self.img_size}, {self.img_size}], "
                            f"got {list(images.shape)}")
        if not 1 <= images.shape[0] <= self.max_batch:
            raise UserError(f"{self.name}: batch {images.shape[0]} is outside 1..{self.max_batch} "
                            f"(the bundle's max batch; re-export with a larger --max-batch)")
        return self.infer(images)

    def infer(self, images: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # Release the runtime's weights now, not when the name is rebound: a check opens
        # one artifact after another, and vit-h14's FP32 runners hold 2.5-5 GB each.
        self.close()
        from ..stages import release_memory
        release_memory()


def open_runner(bundle, artifact: dict, threads: int | None = None, device: str | None = None) -> Runner:
    """Verify an artifact's files against the manifest, then open it."""
    path = bundle.verify(artifact)
    mod = backend(artifact["backend"])
    why = mod.available()
    if why is not None:
        raise UserError(why)
    opts = {"threads": threads, "device": device or artifact.get("device"),
            "max_batch": bundle.manifest.get("max_batch", 32), "img_size": bundle.manifest["model"]["img_size"]}
    try:
        return mod.open(Path(path), artifact, opts)
    except UserError:
        raise
    except Exception as e:  # the hash matched, so the file is what the bundle says: its content is bad
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"{path}: {artifact['backend']} could not load this {artifact['precision']} artifact "
                        f"({type(e).__name__}: {first})") from None


def runtime_versions() -> dict:
    from ..versions import version_of
    return {d: version_of(d) for d in ("torch", "onnx", "onnxruntime", "openvino", "tensorrt")}
