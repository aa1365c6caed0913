"""`vit-deploy predict`: top-k classes for images, with the bundle's own preprocessing."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from .bundle import MANIFEST, Bundle
from .errors import UserError
from .images import load_images
from .zoo import Preprocessing

# Without --backend: the artifact most likely to be fastest on this machine.
PREFERENCE = ("tensorrt-int8", "tensorrt-fp16", "onnxruntime-int8", "openvino-int8", "openvino-fp32",
              "onnxruntime-fp32", "onnx-int8", "onnx-fp32")


def locate(target) -> tuple[Bundle, dict | None]:
    """A bundle directory, its manifest, or one artifact file inside a bundle."""
    p = Path(target)
    if not p.exists():
        raise UserError(f"not found: {target}")
    if p.is_dir() or p.name == MANIFEST:
        return Bundle.open(p), None
    for parent in p.resolve().parents:
        if (parent / MANIFEST).is_file():
            b = Bundle.open(parent)
            rel = str(p.resolve().relative_to(parent.resolve()))
            art = next((a for a in b.artifacts if a["path"] == rel or rel in a.get("files", {})), None)
            if art is None:
                raise UserError(f"{p}: not an artifact listed in {parent / MANIFEST}")
            return b, art
    raise UserError(f"{p}: not inside a vit-deploy bundle (no {MANIFEST} above it)")


def choose(bundle: Bundle, backend: str | None) -> dict:
    names = {f"{a['backend']}-{a['precision']}": a for a in bundle.artifacts}
    if backend:
        if backend in names:
            return names[backend]
        matches = [a for n, a in names.items() if n.startswith(backend + "-")]
        if matches:
            return sorted(matches, key=lambda a: ("int8", "fp16", "fp32").index(a["precision"]))[0]
        raise UserError(f"{bundle.dir}: no artifact for '{backend}'; it has {', '.join(names) or 'none'}")
    from .backends import backend as backend_module
    for name in PREFERENCE:
        if name in names and backend_module(names[name]["backend"]).available() is None:
            return names[name]
    raise UserError(f"{bundle.dir}: no artifact that this machine can run; it has {', '.join(names) or 'none'}")


def class_names(manifest: dict) -> list[str]:
    m = manifest["model"]
    if m.get("labels"):
        return list(m["labels"])
    if m["num_classes"] == 1000:
        text = resources.files("vit_deploy").joinpath("data/imagenet_classes.txt").read_text()
        return text.splitlines()
    return [f"class {i}" for i in range(m["num_classes"])]


def predict(target, images, backend: str | None = None, top: int = 5, threads: int | None = None,
            embeddings_out="embeddings.npy") -> list[dict]:
    """Top classes per image; for an embedding bundle, the embeddings go to `embeddings_out` (.npy,
    one row per image in order) and each result gives its row, shape and L2 norm."""
    from .backends import open_runner
    bundle, art = locate(target)
    art = art or choose(bundle, backend)
    paths = [Path(p) for p in images]
    for p in paths:
        if not p.is_file():
            raise UserError(f"image not found: {p}")
    pre = Preprocessing.from_dict(bundle.manifest["preprocessing"])
    x, ok = load_images(paths, pre, strict=True)
    with open_runner(bundle, art, threads=threads) as runner:
        step = runner.max_batch
        logits = np.concatenate([runner(x[i:i + step]) for i in range(0, len(x), step)])
    if bundle.manifest["model"].get("output") == "embedding":
        return _write_embeddings(logits, ok, f"{art['backend']}-{art['precision']}", embeddings_out)
    names = class_names(bundle.manifest)
    e = np.exp(logits - logits.max(1, keepdims=True))
    probs = e / e.sum(1, keepdims=True)
    out = []
    for path, p in zip(ok, probs):
        idx = np.argsort(-p)[:top]
        out.append({"image": str(path), "artifact": f"{art['backend']}-{art['precision']}",
                    "top": [{"class": int(i), "name": names[i], "probability": float(p[i])} for i in idx]})
    return out


def _write_embeddings(emb: np.ndarray, paths, artifact: str, out) -> list[dict]:
    from .atomic import atomic_path
    out = Path(out)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, emb.astype(np.float32))
    norms = np.linalg.norm(emb.astype(np.float64), axis=1)
    return [{"image": str(p), "artifact": artifact, "embedding": {"file": str(out), "row": i,
                                                                  "shape": list(emb[i].shape), "norm": float(n)}}
            for i, (p, n) in enumerate(zip(paths, norms))]
