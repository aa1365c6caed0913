"""FP32 ONNX -> FP16 ONNX with LayerNormalization kept in FP32.

For strongly typed TensorRT networks (the only kind in TensorRT 11, the
recommended one since 10.12): the precision of every tensor is in the graph.
LayerNorm stays FP32 because trained ViTs carry activations near 1400, whose
squares overflow FP16 (65504). Input and output stay FP32 for the caller.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

KEEP_FP32 = ("LayerNormalization",)


def _to_half(t: TensorProto) -> TensorProto:
    arr = numpy_helper.to_array(t)
    return numpy_helper.from_array(arr.astype(np.float16), t.name)


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    keep = {i for n in g.node if n.op_type in KEEP_FP32 for i in n.input[1:]}  # LayerNorm scale and bias
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT and t.name not in keep:
            g.initializer[i].CopyFrom(_to_half(t))
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT and n.op_type in (
                    "Constant", "ConstantOfShape"):
                a.t.CopyFrom(_to_half(a.t))
        if n.op_type == "Cast":
            for a in n.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16
    new_nodes = []
    # graph input: FP32 in, FP16 inside
    for inp in g.input:
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT:
            half = inp.name + "_fp16"
            for n in g.node:
                for k, name in enumerate(n.input):
                    if name == inp.name:
                        n.input[k] = half
            new_nodes.append(helper.make_node("Cast", [inp.name], [half], to=TensorProto.FLOAT16,
                                              name=inp.name + "_to_fp16"))
    body = []
    for n in g.node:
        if n.op_type in KEEP_FP32:
            x32, y32 = n.input[0] + f"_{n.name}_fp32", n.output[0] + "_fp32"
            body.append(helper.make_node("Cast", [n.input[0]], [x32], to=TensorProto.FLOAT, name=n.name + "_in_fp32"))
            y = n.output[0]
            n.input[0], n.output[0] = x32, y32
            body.append(n)
            body.append(helper.make_node("Cast", [y32], [y], to=TensorProto.FLOAT16, name=n.name + "_out_fp16"))
            del n.output[1:]  # mean / inv-std outputs are unused by inference
        else:
            body.append(n)
    # graph outputs: FP16 inside, FP32 out
    for o in g.output:
        if o.type.tensor_type.elem_type == TensorProto.FLOAT:
            half = o.name + "_fp16"
            for n in body:
                for k, name in enumerate(n.output):
                    if name == o.name:
                        n.output[k] = half
            body.append(helper.make_node("Cast", [half], [o.name], to=TensorProto.FLOAT, name=o.name + "_to_fp32"))
    del g.node[:]
    g.node.extend(new_nodes + body)
    del g.value_info[:]  # stale FP32 types; runtimes infer them again
    return out
