"""The portable Q/DQ model -> the form OpenVINO's CPU plugin runs fastest.

Why a rewrite: OpenVINO reads each QuantizeLinear/DequantizeLinear pair as a
FakeQuantize and keeps its signedness for the matrix product behind it. The x86
INT8 kernels multiply unsigned activations by signed weights (VNNI vpdpbusd,
AVX2 vpmaddubsw), so an int8 activation costs a shift by 128 and a compensation
term on every run. NNCF's OpenVINO models run these products with u8 activations.
Measured on timm's ViT-S/16 (benchmarks/int8_peers.py): see the README.

The rewrite is exact, as for ONNX Runtime (ort_int8.to_uint8_activations): an
int8 activation q with zero point 0 is the uint8 value q + 128 with zero point 128.
The portable file keeps int8 with zero point 0, which TensorRT requires.

Only the activations of products with a constant weight change:
- The attention products keep int8 operands. With uint8 ones OpenVINO no longer
  fuses Q.K^T -> Softmax -> P.V into its INT8 attention kernel (24 float MatMuls
  on a ViT-S/16 instead of 12 INT8 subgraphs, and slower than the int8 form).
- Only where every such weight is within +-63 (the overflow fix, on by default for
  CPU targets). CPUs without VNNI or dot-product instructions add pairs of 8-bit
  products in 16 bits: 255 x 63 x 2 fits, 255 x 127 x 2 does not, while the int8
  form's 127 x 127 x 2 did. A file quantized with the fix off stays as it was.
"""
from __future__ import annotations

import numpy as np
import onnx

from .. import onnx_io
from .ort_int8 import to_uint8_activations

PRODUCTS = ("MatMul", "Gemm", "Conv")
SAFE_WEIGHT = 63  # 255 * 63 * 2 = 32130 <= 32767


def _small_weight_products(model: onnx.ModelProto):
    """A predicate on a QuantizeLinear's DequantizeLinear consumers: True when every node
    they feed is a product whose other operand is a dequantized int8 constant within +-63."""
    inits, producers, consumers = onnx_io.graph_index(model)
    safe: dict[str, bool] = {}

    def weight_is_small(node) -> bool:
        for i in node.input:
            dq = producers.get(i)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
                continue
            w = dq.input[0]
            if w not in safe:
                t = inits[w]
                safe[w] = t.data_type == onnx.TensorProto.INT8 and \
                    int(np.abs(onnx_io.array(t).astype(np.int16)).max(initial=0)) <= SAFE_WEIGHT
            return safe[w]
        return False  # no constant operand: an attention product

    def accept(dequantizers) -> bool:
        users = [u for dq in dequantizers for u in consumers.get(dq.output[0], [])]
        return bool(users) and all(u.op_type in PRODUCTS and weight_is_small(u) for u in users)
    return accept


def for_openvino(model: onnx.ModelProto) -> dict:
    """The rewrite, in place; returns what was done (for the manifest)."""
    return {"uint8_activations": to_uint8_activations(model, where=_small_weight_products(model))}
