"""The portable Q/DQ model -> the form ONNX Runtime's CPU provider runs as INT8 kernels.

Why a rewrite: ONNX Runtime turns `DequantizeLinear -> MatMul` into its INT8 kernel
(MatMulIntegerToFloat) only for uint8 activations. It converts an int8 Q/DQ pair to
uint8 itself, but only when the QuantizeLinear has a single DequantizeLinear after it.
Where one tensor feeds several products (the separate query/key/value projections
of Hugging Face exports), the pair is shared; splitting it does not help, because
ONNX Runtime's common-subexpression elimination merges the copies again before the
conversion. Measured on a Hugging Face ViT export: 18 of 36 MatMuls became INT8
kernels as written, 36 of 36 after this rewrite.

The rewrite is exact: an int8 activation q with zero point 0 is the uint8 value
q + 128 with zero point 128 (same scale, same rounding, same clipping). Weights
stay int8. A product that ONNX Runtime has no INT8 kernel for without a quantized
output (the patch-embedding Conv) gets its weight dequantized once here, so no run
pays for it: the same numbers, stored in float.

A Linear on a 2-D input (the class token alone: Hugging Face ViTModel's pooler) is
written as the kernel (MatMulIntegerToFloat) here: ONNX Runtime would fuse its MatMul
and bias Add into a float Gemm first, and dequantize its weight on every run.

The attention products (activation x activation MatMuls, quantized in the portable
file for OpenVINO and TensorRT) run in float here: ONNX Runtime quantizes both
operands on every run for a small product, which cost more than it saved (a
ViT-S/16 at batch 1: 35.3 ms with them in INT8 against 31.8 ms without, same run).
The Clip before their second operand goes too (is_operand_clip): it is there for the
INT8 kernels alone.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..onnx_io import drop_dead_nodes, drop_unused_initializers, graph_index


def whole_steps(value: float, scale: float) -> int | None:
    """k when `value` is k whole quantization steps of `scale` (to 1e-3 of a step, |k| <= 127),
    else None: how a constant that vit-deploy's quantize wrote in steps is told apart."""
    k = value / scale
    return int(round(k)) if abs(k - round(k)) < 1e-3 and abs(round(k)) <= 127 else None


def _whole_step_centre(sub, inits, consumers, scale: np.ndarray) -> int | None:
    """k when `sub` is x - c with c a scalar constant of k whole quantization steps (the
    centred scheme, quantize._centres) read by one QuantizeLinear alone; else None."""
    if sub is None or sub.op_type != "Sub" or sub.input[1] not in inits or len(consumers.get(sub.output[0], [])) != 1:
        return None
    c = numpy_helper.to_array(inits[sub.input[1]])
    if c.size != 1 or scale.size != 1:
        return None
    return whole_steps(float(c.reshape(())), float(scale.reshape(())))


def to_uint8_activations(model: onnx.ModelProto, where=None) -> int:
    """Int8 activation Q/DQ pairs -> uint8 with the zero point moved by 128, in place.
    Each converted pair gets zero points of its own (the int8 ones may be shared with
    weights); recorded intermediate types are updated. `where(dequantizers)`, if given,
    picks the pairs to convert. Returns how many Q nodes.

    A centred activation, Sub(x, k steps) -> Q, loses its Sub: Q quantizes x with zero
    point 128 - k and gives the same integers, its DequantizeLinear keeps 128 and so
    still gives x - c, which the biases expect (one elementwise pass less per product)."""
    g = model.graph
    inits, producers, consumers = graph_index(model)
    changed = 0
    for n in list(g.node):
        if n.op_type != "QuantizeLinear" or len(n.input) < 3 or n.input[0] in inits:
            continue
        zp = inits.get(n.input[2])
        if zp is None or zp.data_type != onnx.TensorProto.INT8:
            continue
        after = consumers.get(n.output[0], [])
        if not after or any(c.op_type != "DequantizeLinear" for c in after):
            continue
        if where is not None and not where(after):
            continue
        name = f"{n.output[0]}_zero_point_u8"
        value = (numpy_helper.to_array(zp).astype(np.int16) + 128).astype(np.uint8)
        g.initializer.append(numpy_helper.from_array(value, name))
        for node in [n, *after]:
            node.input[2] = name
        sub = producers.get(n.input[0])
        k = _whole_step_centre(sub, inits, consumers, numpy_helper.to_array(inits[n.input[1]])) \
            if n.input[1] in inits else None
        if k is not None and value.size == 1 and int(value.reshape(())) == 128:
            g.initializer.append(numpy_helper.from_array(np.array(128 - k, np.uint8), name + "_centred"))
            n.input[0], n.input[2] = sub.input[0], name + "_centred"
        for vi in g.value_info:
            if vi.name == n.output[0]:
                vi.type.tensor_type.elem_type = onnx.TensorProto.UINT8
        changed += 1
    drop_dead_nodes(model)
    drop_unused_initializers(model)
    return changed


def fold_conv_weights(model: onnx.ModelProto) -> int:
    """DequantizeLinear(int8 constant) -> Conv becomes a float constant; returns how many."""
    inits, producers, consumers = graph_index(model)
    dropped, folded = set(), 0
    for n in model.graph.node:
        if n.op_type != "Conv":
            continue
        dq = producers.get(n.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or len(consumers.get(dq.output[0], [])) != 1:
            continue
        if not all(i in inits for i in dq.input):
            continue
        q, scale = numpy_helper.to_array(inits[dq.input[0]]), numpy_helper.to_array(inits[dq.input[1]])
        zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 else np.zeros_like(scale)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        w = ((q.astype(np.float32) - zp.astype(np.float32).reshape(shape)) * scale.reshape(shape)).astype(np.float32)
        name = dq.output[0] + "_folded"
        model.graph.initializer.append(numpy_helper.from_array(w, name))
        n.input[1] = name
        dropped.add(id(dq))
        folded += 1
    keep = [n for n in model.graph.node if id(n) not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    drop_unused_initializers(model)
    return folded


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Gemm(x, DequantizeLinear(int8 W), bias) -> MatMul + Add, in place: ONNX Runtime has
    an INT8 kernel for DQ -> MatMul without a quantized output, none for Gemm (timm exports
    Linear layers on 2-D inputs, such as heads, as Gemm). Returns how many."""
    g = model.graph
    inits, producers, consumers = graph_index(model)
    nodes, done = [], 0
    for n in g.node:
        attrs = {a.name: (a.f if a.type == onnx.AttributeProto.FLOAT else a.i) for a in n.attribute}
        dq = producers.get(n.input[1]) if n.op_type == "Gemm" else None
        if (dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or len(consumers[dq.output[0]]) != 1):
            nodes.append(n)
            continue
        if attrs.get("transB", 0):  # weights [out, in] per output channel (axis 0) -> [in, out], axis 1
            q = numpy_helper.to_array(inits[dq.input[0]]).T.copy()
            name = dq.input[0] + "_transposed"
            g.initializer.append(numpy_helper.from_array(q, name))
            dq.input[0] = name
            for a in dq.attribute:
                if a.name == "axis":
                    a.i = 1
        out = n.output[0]
        if len(n.input) > 2 and n.input[2]:
            mm = out + "_matmul"
            nodes.append(onnx.helper.make_node("MatMul", [n.input[0], n.input[1]], [mm], name=n.name + "_matmul"))
            nodes.append(onnx.helper.make_node("Add", [mm, n.input[2]], [out], name=n.name + "_bias"))
        else:
            nodes.append(onnx.helper.make_node("MatMul", [n.input[0], n.input[1]], [out], name=n.name + "_matmul"))
        done += 1
    del g.node[:]
    g.node.extend(nodes)
    return done


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """{tensor: rank} by ONNX shape inference on the graph alone (initializers given as typed
    inputs, so no weight is copied: vit-h14's would pass protobuf's limit)."""
    g = model.graph
    light = onnx.helper.make_model(
        onnx.helper.make_graph(list(g.node), "ranks", list(g.input) + [
            onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer],
            list(g.output)), opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(light).graph
    except Exception:  # a graph inference cannot follow: leave its products to ONNX Runtime
        return {}
    return {v.name: len(v.type.tensor_type.shape.dim) for v in list(inferred.value_info) + list(inferred.input)
            if v.type.tensor_type.HasField("shape")}


def rank2_products_as_kernels(model: onnx.ModelProto) -> int:
    """DQ(uint8 x) -> MatMul <- DQ(int8 W) [-> Add(bias)] with a 2-D x -> one MatMulIntegerToFloat
    (ONNX Runtime's INT8 kernel, com.microsoft), in place; after to_uint8_activations and
    gemm_to_matmul. ONNX Runtime fuses MatMul + Add on 2-D inputs into a float Gemm (its
    MatMulAddFusion) before its INT8 fusion looks, so a Linear on the class token alone
    (Hugging Face ViTModel's pooler, CaiT's class attention) dequantized its weight on every
    run; written as the kernel, it stays one. Returns how many."""
    g = model.graph
    inits, producers, consumers = graph_index(model)
    ranks = None
    replaced: dict[int, onnx.NodeProto] = {}  # id(MatMul) -> kernel (node names may be empty)
    gone: set[int] = set()  # ids of the bias Adds taken into a kernel
    for n in g.node:
        if n.op_type != "MatMul":
            continue
        dq_a, dq_w = producers.get(n.input[0]), producers.get(n.input[1])
        if not (dq_a is not None and dq_w is not None and dq_a.op_type == dq_w.op_type == "DequantizeLinear"
                and dq_w.input[0] in inits and inits[dq_w.input[0]].data_type == onnx.TensorProto.INT8
                and dq_a.input[0] not in inits and len(dq_a.input) == 3 and dq_a.input[2] in inits
                and inits[dq_a.input[2]].data_type == onnx.TensorProto.UINT8
                and all(numpy_helper.to_array(inits[i]).size == 1 for i in dq_a.input[1:])):
            continue
        w_scale = numpy_helper.to_array(inits[dq_w.input[1]]) if dq_w.input[1] in inits else None
        columns = inits[dq_w.input[0]].dims[-1]
        axis = next((a.i for a in dq_w.attribute if a.name == "axis"), 1)
        if w_scale is None or len(inits[dq_w.input[0]].dims) != 2 or (w_scale.size != 1 and (
                w_scale.size != columns or axis not in (1, -1))):
            continue
        if ranks is None:
            ranks = _ranks(model)
        if ranks.get(n.input[0]) != 2:
            continue
        out, bias = n.output[0], ""
        after = consumers.get(out, [])
        if len(after) == 1 and after[0].op_type == "Add" and out not in {o.name for o in g.output}:
            add = after[0]
            other = add.input[1] if add.input[0] == out else add.input[0]
            b = inits.get(other)
            if b is not None and b.data_type == onnx.TensorProto.FLOAT and list(b.dims) == [columns]:
                out, bias = add.output[0], other
                gone.add(id(add))
        inputs = [dq_a.input[0], dq_w.input[0], dq_a.input[1], dq_w.input[1], dq_a.input[2],
                  dq_w.input[2] if len(dq_w.input) > 2 else "", bias]
        while inputs and not inputs[-1]:
            inputs.pop()
        replaced[id(n)] = onnx.helper.make_node("MatMulIntegerToFloat", inputs, [out], name=(n.name or out) + "_int8",
                                                domain="com.microsoft")
    if not replaced:
        return 0
    nodes = [replaced.get(id(n), n) for n in g.node if id(n) not in gone]
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.add(domain="com.microsoft", version=1)
    drop_dead_nodes(model)
    drop_unused_initializers(model)
    return len(replaced)


def is_operand_clip(node, inits, scale: np.ndarray) -> bool:
    """The Clip that quantize._clip_operand puts before an attention operand's QuantizeLinear:
    its name, and bounds of -k and +k whole steps of that quantizer. It exists for the INT8
    kernels alone (no -128, or 7 bits); a product run in float has nothing to clip for."""
    if node is None or node.op_type != "Clip" or not node.name.endswith("_ClipOperand") or len(node.input) != 3 \
            or not all(i in inits for i in node.input[1:]) or scale.size != 1:
        return False
    bounds = [numpy_helper.to_array(inits[i]) for i in node.input[1:]]
    if any(b.size != 1 for b in bounds):
        return False
    lo, hi = (float(b.reshape(())) for b in bounds)
    k = whole_steps(hi, float(scale.reshape(())))
    return lo == -hi and k is not None and k > 0


def float_attention_products(model: onnx.ModelProto) -> int:
    """Each MatMul whose two operands are dequantized activations reads them before their
    QuantizeLinear instead (before the operand's Clip too, is_operand_clip); the orphaned
    Q/DQ and Clip nodes go. Returns how many products."""
    g = model.graph
    inits, producers, _ = graph_index(model)

    def float_source(tensor: str) -> str | None:
        dq = producers.get(tensor)
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or q.input[0] in inits:
            return None
        clip = producers.get(q.input[0])
        if q.input[1] in inits and is_operand_clip(clip, inits, numpy_helper.to_array(inits[q.input[1]])):
            return clip.input[0]
        return q.input[0]

    done = 0
    for n in g.node:
        if n.op_type == "MatMul":
            sources = [float_source(i) for i in n.input]
            if all(sources):
                n.input[:] = sources
                done += 1
    drop_dead_nodes(model)
    drop_unused_initializers(model)
    return done


def for_onnxruntime(model: onnx.ModelProto) -> dict:
    """The rewrites, in place; returns what was done (for the manifest)."""
    return {"float_attention_products": float_attention_products(model),
            "uint8_activations": to_uint8_activations(model), "folded_conv_weights": fold_conv_weights(model),
            "gemm_to_matmul": gemm_to_matmul(model), "rank2_kernels": rank2_products_as_kernels(model)}
