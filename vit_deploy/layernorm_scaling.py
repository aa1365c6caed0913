"""Per-channel rescaling between a LayerNorm and the Linear layers that read it.

LayerNorm ends in y_j = n_j * gamma_j + beta_j, and every Linear that reads y sums
y_j * W[j, :]. Multiplying gamma_j and beta_j by f_j and dividing row j of each
reading weight by f_j leaves the Linear outputs unchanged (in exact arithmetic).
Two uses, one operation:
- outlier migration (SmoothQuant, f_j = 1 / s_j): shrinks the few huge channels that
  trained ViTs carry after LayerNorm, so the per-tensor activation scale fits the rest;
  the weights take the range instead, where it is per output channel;
- the outlier stand-in for tests (f_j = 20..100 on a few channels): random weights
  then carry the inter-channel spread of trained ViTs.
The LayerNorm may be one LayerNormalization op (opset >= 17) or the decomposed form
older exporters write (..., Mul by gamma, Add beta).

Where no LayerNorm feeds the Linear (fc2 after GELU, the attention projection after
the heads are merged) there is no gamma to absorb f, so an explicit Mul by f goes
between the tensor and its readers: still exact, at the price of one elementwise op
(OpenVINO and TensorRT fuse it into the neighbouring kernels; ONNX Runtime runs it).
Trained ViTs need it there: their fc2 inputs carry a few post-GELU channels 20-100x
the rest ("massive activations"), and a per-tensor int8 scale either clips them or
spends its levels on them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .onnx_io import array, drop_unused_initializers, graph_index, tensor


@dataclass
class LayerNormGroup:
    output: str                       # the LayerNorm's output tensor
    gamma: tuple[str, int] | None     # (node name, input index) of the scale; None: an explicit Mul
    beta: tuple[str, int] | None      # (node name, input index) of the bias
    readers: list[tuple[str, int]]    # (node name, input index) of each reading weight [in, out]


def _initializer(name: str, inits: dict, producers: dict):
    """The initializer behind `name`, following Identity nodes (torch dedupes equal tensors that way)."""
    while name not in inits and name in producers and producers[name].op_type == "Identity":
        name = producers[name].input[0]
    return inits.get(name)


def _constant(model, name: str, inits: dict, producers: dict) -> np.ndarray | None:
    t = _initializer(name, inits, producers)
    return None if t is None else array(t)


def _dims(name: str, inits: dict, producers: dict) -> tuple | None:
    """A constant's shape without reading it (a weight may be in a data file: onnx_io.load_lazy)."""
    t = _initializer(name, inits, producers)
    return None if t is None else tuple(t.dims)


def find_groups(model: onnx.ModelProto) -> list[LayerNormGroup]:
    """LayerNorms whose every reader is a MatMul/Gemm with a constant 2-D weight on its
    input channels: only there is the rescaling exact and free."""
    g = model.graph
    inits, producers, consumers = graph_index(model)
    outputs = {o.name for o in g.output}
    groups = []
    for n in g.node:
        found = _layernorm_end(model, n, inits, producers)
        if found is None:
            continue
        gamma, beta, width = found
        out = n.output[0]
        readers = _weight_readers(model, out, consumers.get(out, []), inits, producers, width)
        if readers and out not in outputs:
            groups.append(LayerNormGroup(out, gamma, beta, readers))
    return groups


def _weight_readers(model, out, consumers, inits, producers, width):
    """Each consumer's (node, weight input) when every consumer of `out` is a Linear
    reading it on `width` input channels (a Shape reads only the shape); else []."""
    readers = []
    for c in consumers:
        if c.op_type == "Shape":
            continue
        w = _reader_weight(model, c, out, inits, producers, width)
        if w is None:
            return []
        readers.append(w)
    return readers


def find_product_inputs(model: onnx.ModelProto, skip=()) -> list[LayerNormGroup]:
    """Tensors that no LayerNorm writes (not in `skip`) and that only Linears read: their
    rescaling needs an explicit Mul (gamma None)."""
    g = model.graph
    inits, producers, consumers = graph_index(model)
    outputs = {o.name for o in g.output}
    groups = []
    for n in g.node:
        for out in n.output:
            if out in skip or out in outputs or out not in consumers:
                continue
            first = next((c for c in consumers[out] if c.op_type != "Shape"), None)
            ref = first is not None and _reader_weight(model, first, out, inits, producers, None)
            if not ref:
                continue
            dims = _dims(first.input[1], inits, producers)
            trans_b = first.op_type == "Gemm" and any(a.name == "transB" and a.i for a in first.attribute)
            readers = _weight_readers(model, out, consumers[out], inits, producers, dims[1 if trans_b else 0])
            if readers:
                groups.append(LayerNormGroup(out, None, None, readers))
    return groups


def _layernorm_end(model, n, inits, producers):
    """(gamma ref, beta ref, width) when `n` is the last op of a LayerNorm, else None."""
    if n.op_type == "LayerNormalization":
        axis = next((a.i for a in n.attribute if a.name == "axis"), -1)
        gamma = _constant(model, n.input[1], inits, producers)
        if axis != -1 or gamma is None or gamma.ndim != 1:
            return None
        beta = (n.name, 2) if len(n.input) > 2 and n.input[2] else None
        if beta and _constant(model, n.input[2], inits, producers) is None:
            return None
        return (n.name, 1), beta, gamma.shape[0]
    if n.op_type != "Add":  # decomposed: Add(Mul(Div(x - mean, std), gamma), beta)
        return None
    for bi in (0, 1):
        beta = _constant(model, n.input[bi], inits, producers)
        mul = producers.get(n.input[1 - bi])
        if beta is None or beta.ndim != 1 or mul is None or mul.op_type != "Mul":
            continue
        for gi in (0, 1):
            gamma = _constant(model, mul.input[gi], inits, producers)
            div = producers.get(mul.input[1 - gi])
            if gamma is not None and gamma.shape == beta.shape and div is not None and div.op_type == "Div":
                return (mul.name, gi), (n.name, bi), gamma.shape[0]
    return None


def _reader_weight(model, node, tensor, inits, producers, width):
    """(node, 1) when `node` is a Linear reading `tensor` on `width` input channels (None: any)."""
    if node.op_type == "MatMul" and node.input[0] == tensor:
        dims = _dims(node.input[1], inits, producers)
        if dims is not None and len(dims) == 2 and width in (None, dims[0]):
            return (node.name, 1)
    if node.op_type == "Gemm" and node.input[0] == tensor:
        attrs = {a.name: a.i for a in node.attribute}
        dims = _dims(node.input[1], inits, producers)
        if attrs.get("transA", 0) == 0 and dims is not None and len(dims) == 2:
            if width in (None, dims[1 if attrs.get("transB", 0) else 0]):
                return (node.name, 1)
    return None


def _set(model, ref: tuple[str, int], value: np.ndarray, tag: str) -> None:
    """Give the input `ref` a new initializer of its own (the old one may be shared)."""
    node = next(n for n in model.graph.node if n.name == ref[0])
    name = f"{node.name}_{ref[1]}_{tag}"  # per node and input: the old initializer may be shared
    model.graph.initializer.append(tensor(value, name))
    node.input[ref[1]] = name


def _get(model, ref):
    node = next(n for n in model.graph.node if n.name == ref[0])
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    return node, _constant(model, node.input[ref[1]], inits, producers)


def scale_channels(model: onnx.ModelProto, group: LayerNormGroup, factors: np.ndarray, tag: str) -> None:
    """gamma, beta *= factors (or the tensor, by a new Mul); each reader's weight rows /=
    factors (in place)."""
    factors = factors.astype(np.float32)
    if group.gamma is None:
        _insert_mul(model, group.output, factors, tag)
    else:
        _, gamma = _get(model, group.gamma)
        _set(model, group.gamma, (gamma * factors).astype(np.float32), tag)
    if group.beta:
        _, beta = _get(model, group.beta)
        _set(model, group.beta, (beta * factors).astype(np.float32), tag)
    for ref in group.readers:
        node, w = _get(model, ref)
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        w = w / factors[None, :] if trans_b else w / factors[:, None]
        _set(model, ref, w.astype(np.float32), tag)
    drop_unused_initializers(model)


def _insert_mul(model: onnx.ModelProto, name: str, factors: np.ndarray, tag: str) -> None:
    """`name` becomes Mul(its old value, factors): the producer writes `name`_<tag>_in
    instead, so every reader (and the calibration statistics' name) stays."""
    g = model.graph
    at, producer = next((i, n) for i, n in enumerate(g.node) if name in n.output)
    raw = f"{name}_{tag}_in"
    producer.output[list(producer.output).index(name)] = raw
    g.initializer.append(tensor(factors, f"{name}_{tag}_factors"))
    g.node.insert(at + 1, onnx.helper.make_node("Mul", [raw, f"{name}_{tag}_factors"], [name], name=f"{name}_{tag}_Mul"))


def reader_weights(model: onnx.ModelProto, group: LayerNormGroup) -> list[np.ndarray]:
    """Each reader's weight as [in, out] (Gemm's transB undone)."""
    out = []
    for ref in group.readers:
        node, w = _get(model, ref)
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        out.append(w.T if trans_b else w)
    return out


def reader_weight_absmax(model: onnx.ModelProto, group: LayerNormGroup) -> np.ndarray:
    """Per input channel, the largest |weight| over every reader (SmoothQuant's max|W_j|)."""
    return np.max([np.abs(w).max(axis=1) for w in reader_weights(model, group)], axis=0)


def inject_outliers(model: onnx.ModelProto, channels: int = 4, low: float = 20.0, high: float = 100.0,
                    seed: int = 0) -> onnx.ModelProto:
    """The test stand-in for trained-model outliers: a copy of `model` whose LayerNorm
    outputs carry a few channels 20-100x larger, with the same outputs in FP32."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, group in enumerate(find_groups(out)):
        _, gamma = _get(out, group.gamma)
        factors = np.ones(gamma.shape[0], np.float32)
        pick = rng.choice(gamma.shape[0], size=min(channels, gamma.shape[0]), replace=False)
        factors[pick] = rng.uniform(low, high, size=len(pick))
        scale_channels(out, group, factors, f"outlier{i}")
    return out


def _fc1_of(fc2, inits, producers):
    """The Linear (MatMul with a constant weight) behind fc2's input, through the activation ops."""
    stack, seen = [fc2.input[0]], set()
    while stack:
        n = producers.get(stack.pop())
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        if n.op_type == "MatMul" and n.input[1] in inits:
            return n
        stack += [i for i in n.input if i not in inits]
    return None


def inject_mlp_outliers(model: onnx.ModelProto, channels: int = 4, low: float = 20.0, high: float = 100.0,
                        seed: int = 1) -> onnx.ModelProto:
    """The test stand-in for the "massive activations" of trained ViTs at the fc2 input:
    in each MLP, a few hidden channels' fc1 weight column and bias are multiplied by
    20-100x and the matching fc2 weight rows divided by the same. GELU is not linear, so
    unlike `inject_outliers` this changes the function (those channels become nearly
    ReLU, 20-100x larger after the GELU): compare INT8 with this model's own FP32."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits, producers, consumers = graph_index(out)
    for i, fc2 in enumerate([n for n in out.graph.node if n.op_type == "MatMul" and n.input[1] in inits]):
        w2 = array(inits[fc2.input[1]])
        fc1 = _fc1_of(fc2, inits, producers) if w2.ndim == 2 and w2.shape[0] > w2.shape[1] else None
        w1 = None if fc1 is None else array(inits[fc1.input[1]])
        if w1 is None or w1.ndim != 2 or w1.shape[1] != w2.shape[0]:
            continue
        hidden = w2.shape[0]
        f = np.ones(hidden, np.float32)
        pick = rng.choice(hidden, size=min(channels, hidden), replace=False)
        f[pick] = rng.uniform(low, high, size=len(pick))
        # new initializers per input (_set): torch's exporter shares equal tensors between layers
        _set(out, (fc1.name, 1), (w1 * f[None, :]).astype(np.float32), f"mlp_outlier{i}")
        _set(out, (fc2.name, 1), (w2 / f[:, None]).astype(np.float32), f"mlp_outlier{i}")
        for add in consumers.get(fc1.output[0], []):
            for k, name in enumerate(add.input if add.op_type == "Add" else ()):
                bias = _constant(out, name, inits, producers)
                if bias is not None and bias.shape == (hidden,):
                    _set(out, (add.name, k), (bias * f).astype(np.float32), f"mlp_outlier{i}")
    drop_unused_initializers(out)
    return out


def _first_token_stream(model: onnx.ModelProto) -> str | None:
    """The tensor the first LayerNorm normalizes: the residual stream entering block 0."""
    for n in model.graph.node:  # ONNX keeps nodes in topological order
        axes = next((list(a.ints) for a in n.attribute if a.name == "axes"), None)
        if n.op_type == "LayerNormalization" or (n.op_type == "ReduceMean" and axes == [-1]):
            return n.input[0]
        if n.op_type == "ReduceMean" and len(n.input) > 1:  # opset 18: axes as an input
            return n.input[0]
    return None


def _run_shape(model: onnx.ModelProto, name: str) -> list[int]:
    """The shape of tensor `name` on one zero image (shape inference loses token counts at Expand)."""
    import onnxruntime as ort
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    inp = m.graph.input[0]
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return list(sess.run([name], {inp.name: np.zeros(shape, np.float32)})[0].shape)


def inject_massive_tokens(model: onnx.ModelProto, tokens: int = 2, magnitude: float = 80.0,
                          seed: int = 3) -> onnx.ModelProto:
    """The test stand-in for token-specific "massive activations" (Sun et al. 2024; the
    high-norm tokens of "Vision Transformers Need Registers"): on every image, a few fixed
    patch or register tokens carry a huge value on two channels of the residual stream,
    from block 0 on. Their LayerNorm outputs then hold values ~sqrt(width) on those
    channels in a handful of rows of each tensor: rare, so a clipping range fitted to
    the bulk cuts them, and they are load-bearing (keys every query attends to). Added
    as a constant [1, tokens, width] before the first LayerNorm, not on the class
    token (that would make the pooled output near-constant). Changes the function:
    compare INT8 with this model's own FP32. Needs static token and channel counts."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    stream = _first_token_stream(out)
    dims = [] if stream is None else _run_shape(out, stream)
    if len(dims) != 3 or not (dims[1] > 1 and dims[2] > 1):
        raise ValueError("inject_massive_tokens: no [batch, tokens, width] stream with static sizes found")
    rng = np.random.default_rng(seed)
    bump = np.zeros((1, dims[1], dims[2]), np.float32)
    rows = rng.choice(np.arange(1, dims[1]), size=min(tokens, dims[1] - 1), replace=False)
    channels = rng.choice(dims[2], size=2, replace=False)
    bump[0, rows[:, None], channels[None, :]] = np.array([magnitude, -0.5 * magnitude], np.float32)
    raw = f"{stream}_massive_in"
    for n in out.graph.node:  # every reader of the stream (the LayerNorm, the residual Add) reads the sum
        for i, name in enumerate(n.input):
            if name == stream:
                n.input[i] = raw
    out.graph.initializer.append(tensor(bump, f"{stream}_massive"))
    at = next(i for i, n in enumerate(out.graph.node) if raw in n.input)
    out.graph.node.insert(at, onnx.helper.make_node("Add", [stream, f"{stream}_massive"], [raw],
                                                    name=f"{stream}_massive_Add"))
    return out
