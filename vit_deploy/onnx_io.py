"""Reading and writing ONNX files, small or over protobuf's 2 GB limit.

A model whose weights pass ~1.8 GB is saved with all tensors in one
`<name>.data` file beside it (torch's exporter writes one file per tensor).

Such a model is worked on without its weights in memory: `load_lazy` leaves each
tensor in its data file (the reference made absolute), `array` reads one when it is
needed, `tensor` puts a new large one in a scratch file while `spill_weights` is
active, and `save` streams them all into the saved model's own data file. Protobuf
keeps a message's memory until the whole message goes, so vit-h14's 2.5 GB of
weights held in the message and rewritten twice (smoothing, then int8) cost three
times their size; read and written one tensor at a time they cost one tensor.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

EXTERNAL_THRESHOLD = 1_800_000_000  # bytes of initializers; protobuf stops at 2 GiB
META_PREFIX = "vit_deploy."


def tensor_bytes(t: onnx.TensorProto) -> int:
    """An initializer's size, in memory or not."""
    return int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(tensor_bytes(t) for t in model.graph.initializer)


SPILL_BYTES = 1 << 20  # inside spill_weights, new tensors this large go to a scratch file
ALIGN = 4096          # data-file offsets: page-aligned, so runtimes can map the weights
_spill_dirs: list[str] = []


def _external(t: onnx.TensorProto) -> dict:
    return {e.key: e.value for e in t.external_data}


def _set_external(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(field)
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=k, value=v)
    t.data_location = onnx.TensorProto.EXTERNAL


def load_lazy(path: str | os.PathLike) -> onnx.ModelProto:
    """The model with every external tensor left in its data file (see the module docstring).
    A reference that leaves the model's folder is refused."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    base = path.resolve().parent
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = _external(t)
            where = (base / info.get("location", "")).resolve()
            if not where.is_relative_to(base) or not where.is_file():  # a subfolder is fine, ../ is not
                raise ValueError(f"tensor '{t.name}' points outside the model's folder or at a missing file")
            _set_external(t, str(where), int(info.get("offset", 0)), int(info.get("length", 0)))
    return model


def load_working(path: str | os.PathLike) -> onnx.ModelProto:
    """`load_lazy`, with the weights brought into memory unless they are too large to be
    held (torch's dynamo exporter puts even a 20 MB model's weights in a data file: such a
    model is small, and gets everything a small one gets)."""
    model = load_lazy(path)
    if has_external(model) and not is_large(model):
        inline(model)
    return model


def is_large(model: onnx.ModelProto) -> bool:
    """Weights too large for one protobuf message: kept in their file and streamed."""
    return initializer_bytes(model) > EXTERNAL_THRESHOLD


def inline(model: onnx.ModelProto) -> None:
    """Every initializer held lazily back into the message, in place."""
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            t.CopyFrom(numpy_helper.from_array(array(t), t.name))


def array(t: onnx.TensorProto) -> np.ndarray:
    """An initializer's value, read from its file when it is external (load_lazy, tensor)."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = _external(t)
    if not os.path.isabs(info["location"]):
        raise ValueError(f"tensor '{t.name}': external data not resolved (load the model with load_lazy)")
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
    count = int(np.prod(t.dims, dtype=np.int64))
    with open(info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return np.fromfile(f, dtype=dtype, count=count).astype(dtype.newbyteorder("="), copy=False).reshape(tuple(t.dims))


def tensor(value: np.ndarray, name: str) -> onnx.TensorProto:
    """numpy -> initializer; inside `spill_weights` a large one lives in a scratch file."""
    if not _spill_dirs or value.nbytes < SPILL_BYTES:
        return numpy_helper.from_array(value, name)
    value = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
    where = os.path.join(_spill_dirs[-1], uuid.uuid4().hex)
    value.tofile(where)
    t = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(value.dtype.newbyteorder("=")))
    t.dims.extend(value.shape)
    _set_external(t, where, 0, value.nbytes)
    return t


@contextlib.contextmanager
def spill_weights(enabled: bool = True):
    """While active, `tensor` writes large new initializers to a scratch folder, removed on exit:
    a model built inside must be saved inside."""
    if not enabled:
        yield
        return
    d = tempfile.mkdtemp(prefix="vit-deploy-weights-")
    _spill_dirs.append(d)
    try:
        yield
    finally:
        _spill_dirs.remove(d)
        shutil.rmtree(d, ignore_errors=True)


def has_external(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _bytes_of(t: onnx.TensorProto) -> bytes:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        value = array(t)
        return value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.from_array(numpy_helper.to_array(t)).raw_data


def _write_data_file(model: onnx.ModelProto, data: Path) -> None:
    """Every initializer of 1 KB or more into `data`, one at a time, the model pointing at it.
    Moves the weights out of `model` (as onnx's own writer does)."""
    with open(data, "wb") as f:
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL and tensor_bytes(t) < 1024:
                continue
            blob = _bytes_of(t)
            offset = -(-f.tell() // ALIGN) * ALIGN
            f.seek(offset)
            f.write(blob)
            _set_external(t, data.name, offset, len(blob))
            del blob


def save(model: onnx.ModelProto, path: str | os.PathLike, external: bool | None = None) -> list[str]:
    """Save `model`; returns the file names written (the model first, then its data file).
    With `external`, the weights are moved out of `model` into the data file."""
    path = Path(path)
    if external is None:
        external = is_large(model)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        _write_data_file(model, data)
        onnx.save_model(model, str(path))
        return [path.name, data.name]
    inline(model)  # weights held lazily come back into the message, to be saved inline
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
    # delete in place: rebuilding the list copied every weight (vit-b16: 15 s per quantize)
    for i in reversed([i for i, t in enumerate(g.initializer) if t.name not in used]):
        del g.initializer[i]


def _names_read(nodes) -> set[str]:
    """Every tensor name the nodes read, also inside If/Loop/Scan bodies (outer-scope names)."""
    read = set()
    for n in nodes:
        read.update(n.input)
        for a in n.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                read |= _names_read(sub.node) | {o.name for o in sub.output}
    return read


def drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Remove nodes none of whose outputs is read (after a rewrite bypassed them)."""
    g = model.graph
    while True:
        read = _names_read(g.node) | {o.name for o in g.output}
        live = [n for n in g.node if any(o in read for o in n.output)]
        if len(live) == len(g.node):
            return
        del g.node[:]
        g.node.extend(live)


def toposort(nodes, available: set[str]) -> list:
    """The nodes in an order where each comes after the producers of its inputs;
    `available`: the names that need no producer (graph inputs, initializers)."""
    available = set(available) | {""}
    order, pending = [], list(nodes)
    while pending:
        progressed = False
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                order.append(n)
                available.update(n.output)
                progressed = True
            else:
                rest.append(n)
        if not progressed:
            raise RuntimeError(f"graph has a cycle or a missing input near {rest[0].name}")
        pending = rest
    return order
