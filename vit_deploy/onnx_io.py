"""Reading and writing ONNX files, small or over protobuf's 2 GB limit.

A model whose weights pass ~1.8 GB is saved with all tensors in one
`<name>.data` file beside it (torch's exporter writes one file per tensor).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import onnx

EXTERNAL_THRESHOLD = 1_800_000_000  # bytes of initializers; protobuf stops at 2 GiB
META_PREFIX = "vit_deploy."


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in t.external_data if e.key == "length"), 0))
        else:
            n = 1
            for d in t.dims:
                n *= d
            total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def save(model: onnx.ModelProto, path: str | os.PathLike, external: bool | None = None) -> list[str]:
    """Save `model`; returns the file names written (the model first, then its data file)."""
    path = Path(path)
    if external is None:
        external = initializer_bytes(model) > EXTERNAL_THRESHOLD
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [path.name, data.name]
    onnx.save_model(model, str(path))
    return [path.name]


def save_atomic(model: onnx.ModelProto, path: str | os.PathLike, external: bool | None = None) -> list[str]:
    """`save`, written under the final names in a temporary folder beside `path` (the
    model refers to its data file by name), then renamed into place, the model last."""
    import shutil
    import tempfile

    from .atomic import _fsync_dir
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        names = save(model, tmp / path.name, external)
        for name in reversed(names):  # data first: the model never points at a missing file
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp / name, path.parent / name)
        if len(names) == 1 and path.with_name(path.name + ".data").exists():
            path.with_name(path.name + ".data").unlink()  # an older, external copy's weights
        _fsync_dir(path.parent)
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(path: str | os.PathLike, with_weights: bool = True) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=with_weights)


def files_of(path: str | os.PathLike) -> list[str]:
    """The model file and, when it has one, its single external data file (bundle-relative names)."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return [path.name, data.name] if data.exists() else [path.name]


def set_metadata(model: onnx.ModelProto, meta: dict) -> None:
    """Store `meta` as vit_deploy.* metadata_props (values JSON-encoded)."""
    keep = [p for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=META_PREFIX + k, value=json.dumps(v)))


def get_metadata(model: onnx.ModelProto) -> dict:
    out = {}
    for p in model.metadata_props:
        if p.key.startswith(META_PREFIX):
            try:
                out[p.key[len(META_PREFIX):]] = json.loads(p.value)
            except ValueError:
                out[p.key[len(META_PREFIX):]] = p.value
    return out


def graph_index(model: onnx.ModelProto) -> tuple[dict, dict, dict]:
    """{name: initializer}, {tensor: producing node}, {tensor: [consuming nodes]} of the main graph."""
    g = model.graph
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return {t.name: t for t in g.initializer}, {o: n for n in g.node for o in n.output}, consumers


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers no node reads any more (after a rewrite renamed or replaced them)."""
    g = model.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
