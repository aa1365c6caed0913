"""Fold what the image size fixes: values computed from tensor shapes and constants alone.

Why: a graph exported with a dynamic batch keeps its Shape nodes, and runtimes fold a
Shape only when every dimension is static, so whatever is computed from shapes is
recomputed on every run. A Hugging Face DINOv2 resizes its 37x37 position grid to the
patch grid that way (Shape -> ... -> bicubic Resize): on the trained ViT-S/14 of
benchmarks/real_vit.py that Resize took 45 of ONNX Runtime's 117 ms per INT8 image
(batch 1, 2 threads, 2026-11-28) and as much of the FP32 run. At a fixed image size
it is a constant; only values that also depend on the batch stay computed.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from . import onnx_io

log = logging.getLogger("vit_deploy")

SHAPE_OPS = ("Shape", "Size")
# never folded: their value is not a function of their inputs
NOT_PURE = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli")
# their output's shape depends on the pixels: a Shape behind them is not fixed by the image size
DATA_DEPENDENT_SHAPES = ("NonZero", "Unique", "Compress", "NonMaxSuppression", "TopK", "Loop", "If", "Scan")
MAX_CUT_BYTES = 256 << 20  # weights a folding run may need; more means a Shape deep in the model: left alone


def shape_derived(model: onnx.ModelProto) -> list[str]:
    """Tensors computed from shapes and constants only (at least one Shape/Size among their
    sources) that a node computing from real values reads: the edge to fold."""
    inits = {t.name for t in model.graph.initializer}
    value_free = set(inits) | {""}
    from_shape: set[str] = set()
    for n in model.graph.node:  # ONNX keeps nodes in topological order
        subgraph = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)
        if n.op_type in SHAPE_OPS:
            value_free.update(n.output)
            from_shape.update(n.output)
        elif n.op_type == "Constant" or (not subgraph and n.op_type not in NOT_PURE and n.input
                                         and all(i in value_free for i in n.input)):
            value_free.update(n.output)
            if any(i in from_shape for i in n.input):
                from_shape.update(n.output)
    outputs = {o.name for o in model.graph.output}
    edge = []
    for n in model.graph.node:
        if n.output and all(o in value_free for o in n.output):
            continue  # a value-free node reads them: not the edge yet
        for i in n.input:
            if i in from_shape and i not in outputs and i not in edge:
                edge.append(i)
    return edge


def _within_budget(model: onnx.ModelProto, tensors: list[str]) -> list[str]:
    """The tensors (shallowest first) whose values, together, are computed from at most
    MAX_CUT_BYTES of initializers."""
    producers = {o: n for n in model.graph.node for o in n.output}
    sizes = {t.name: onnx_io.tensor_bytes(t) for t in model.graph.initializer}
    behind = {}
    for tensor in tensors:
        seen, stack = set(), [tensor]
        while stack:
            t = stack.pop()
            if t not in seen:
                seen.add(t)
                n = producers.get(t)
                stack.extend(i for i in (n.input if n is not None else ()) if i)
        behind[tensor] = {t for t in seen if t in sizes}
    chosen, weights = [], set()
    for tensor in sorted(tensors, key=lambda t: sum(sizes[w] for w in behind[t])):
        union = weights | behind[tensor]
        if sum(sizes[w] for w in union) <= MAX_CUT_BYTES:
            chosen.append(tensor)
            weights = union
    return chosen


def _fix_image_size(model: onnx.ModelProto, img_size: int | None) -> None:
    """Give a [batch, C, H, W] input static H and W (img_size where they are symbolic)."""
    for d in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        if not d.HasField("dim_value"):
            d.Clear()
            d.dim_value = img_size


def _values_at(model: onnx.ModelProto, tensors: list[str], shapes: list[list[int]]) -> list[list[np.ndarray]]:
    """The tensors' values for an input of each shape (its pixels do not matter), computed
    on a cut of the graph; [] where the cut needs more than MAX_CUT_BYTES of weights."""
    import onnxruntime as ort

    from .backends.onnxruntime_backend import session_options
    cut = onnx.ModelProto()
    cut.ir_version, cut.producer_name = model.ir_version, "vit-deploy size folding"
    cut.opset_import.extend(model.opset_import)
    g = cut.graph
    g.input.extend(model.graph.input[:1])
    g.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors)
    g.node.extend(model.graph.node)
    onnx_io.drop_dead_nodes(cut)
    read = {i for n in cut.graph.node for i in n.input}
    needed = [t for t in model.graph.initializer if t.name in read]
    if sum(onnx_io.tensor_bytes(t) for t in needed) > MAX_CUT_BYTES or \
            any(t.data_location == onnx.TensorProto.EXTERNAL for t in needed):
        return []
    g.initializer.extend(needed)
    sess = ort.InferenceSession(cut.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    elem = onnx.helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    return [sess.run(None, {model.graph.input[0].name: np.zeros(shape, elem)}) for shape in shapes]


def fold_size_constants(model: onnx.ModelProto, img_size: int | None = None) -> int:
    """In place: fix the image input's height and width (to img_size where dynamic), replace
    each shape-derived value that does not change with the batch by a constant (a Reshape
    target that does, by one with -1 for the batch) and each Flatten whose kept dimensions
    that fixes by a Reshape. Returns how many (0: the model is left as it was)."""
    folded = _fold_values(model, img_size)
    dims = model.graph.input[0].type.tensor_type.shape.dim if len(model.graph.input) == 1 else []
    if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[1:]):
        folded += flatten_as_reshape(model)
    return folded


def flatten_as_reshape(model: onnx.ModelProto) -> int:
    """In place: Flatten(x, axis k >= 1) -> Reshape(x, [-1, prod(dims[k:])]) where shape
    inference gives x's dimensions from k on. Exact. Why: OpenVINO reads a Flatten as a
    Reshape to a computed shape, bounds it by interval arithmetic when the batch is bounded
    (1..max_batch) and loses the static width (LeViT: [7..3136, 1..57344] for [B*T, 128]);
    on LeViT's INT8 graph its CPU plugin then failed at the first run."""
    flattens = [n for n in model.graph.node if n.op_type == "Flatten"]
    if not flattens:
        return 0
    shapes = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # shape inference cannot read some exports: leave their Flattens
        log.info("flatten rewrite skipped: %s", str(e).splitlines()[0][:200])
        return 0
    for v in list(inferred.graph.value_info) + list(inferred.graph.input):
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    done = 0
    for n in flattens:
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        dims = shapes.get(n.input[0])
        if not dims:
            continue
        axis += len(dims) if axis < 0 else 0
        kept = dims[axis:]
        if not 1 <= axis < len(dims) or None in kept or 0 in kept:
            continue
        target = f"{n.output[0]}_flatten_shape"
        model.graph.initializer.append(numpy_helper.from_array(np.array([-1, int(np.prod(kept))], np.int64), target))
        n.op_type = "Reshape"
        del n.attribute[:]
        n.input.append(target)
        done += 1
    return done


def _fold_values(model: onnx.ModelProto, img_size: int | None) -> int:
    if len(model.graph.input) != 1 or any(n.op_type in DATA_DEPENDENT_SHAPES for n in model.graph.node):
        return 0
    edge = shape_derived(model)
    # a Shape read deep in the model (each attention's reshape) would take all its weights
    # to evaluate: those values are the batch-dependent ones anyway, leave them
    edge = _within_budget(model, edge)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if not edge or len(dims) != 4:
        return 0
    chw = [d.dim_value if d.HasField("dim_value") else img_size for d in dims[1:]]
    if None in chw:  # a dynamic image size and none given: nothing is fixed
        return 0
    try:
        values = _values_at(model, edge, [[1, *chw], [3, *chw]])
    except Exception as e:  # a graph ONNX Runtime cannot run in pieces: keep it computed
        log.info("size folding skipped: %s", str(e).splitlines()[0][:200])
        return 0
    if not values:
        return 0
    at1, at3 = values
    fixed = {t: a for t, a, b in zip(edge, at1, at3) if a.shape == b.shape and np.array_equal(a, b)}
    reshapes = _reshape_targets(model, [(t, a, b) for t, a, b in zip(edge, at1, at3) if t not in fixed])
    if not fixed and not reshapes:
        return 0
    _fix_image_size(model, img_size)
    for n in model.graph.node:
        for k, i in enumerate(n.input):
            if i in fixed or (i in reshapes and n.op_type == "Reshape" and k == 1):
                n.input[k] = i + "_at_image_size"
    for t, value in {**fixed, **reshapes}.items():
        model.graph.initializer.append(numpy_helper.from_array(value, t + "_at_image_size"))
    onnx_io.drop_dead_nodes(model)
    onnx_io.drop_unused_initializers(model)
    return len(fixed) + len(reshapes)


def _reshape_targets(model: onnx.ModelProto, varying) -> dict[str, np.ndarray]:
    """{tensor: target with -1 for the batch} for the Reshape targets among `varying`
    ((tensor, value at batch 1, at batch 3)) that differ in one entry alone, 3x at batch 3:
    [B*T, C] -> [-1, C], [B, T, C] -> [-1, T, C]. Exact (Reshape infers the -1 from the
    size); runtimes then see every other dimension as static. Not what mended LeViT's
    OpenVINO failure: flatten_as_reshape alone does (checked with this returning nothing),
    and no speed change was measured from it (timm-vit, ONNX Runtime, 2026-11-29)."""
    readers: dict[str, set] = {}
    for n in model.graph.node:
        for k, i in enumerate(n.input):
            readers.setdefault(i, set()).add((n.op_type, k))
    out = {}
    for t, a, b in varying:
        if readers.get(t) != {("Reshape", 1)} or a.ndim != 1 or a.shape != b.shape or (a == -1).any():
            continue
        differ = np.flatnonzero(a != b)
        if len(differ) == 1 and a[differ[0]] > 0 and b[differ[0]] == 3 * a[differ[0]]:
            target = a.copy()
            target[differ[0]] = -1
            out[t] = target
    return out
