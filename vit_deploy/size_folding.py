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
    """In place: fix the image input's height and width (to img_size where dynamic) and
    replace each shape-derived value that does not change with the batch by a constant.
    Returns how many values were folded (0: the model is left as it was)."""
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
    if not fixed:
        return 0
    _fix_image_size(model, img_size)
    for n in model.graph.node:
        for k, i in enumerate(n.input):
            if i in fixed:
                n.input[k] = i + "_at_image_size"
    for t, value in fixed.items():
        model.graph.initializer.append(numpy_helper.from_array(value, t + "_at_image_size"))
    onnx_io.drop_dead_nodes(model)
    onnx_io.drop_unused_initializers(model)
    return len(fixed)
