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
- Only where every such weight fits 16-bit pair sums (the overflow fix, on by default
  for CPU targets: weight_pairs.py, or +-63). CPUs without VNNI or dot-product
  instructions add pairs of 8-bit products in 16 bits: 255 x 128 fits, 255 x 127 x 2
  does not. A file quantized with the fix off
  stays as it was.
- On x86 CPUs without VNNI or AMX the runner undoes it when it loads the model
  (for_cpus_without_vnni, with the attention products in float there): OpenVINO
  runs int8 activations faster on those (signed_activations says by how much).

A second, exact rewrite moves a Transpose on an attention operand (timm's
k.transpose(-2, -1), then the scale, the clip and the Q/DQ pair) to just before
its MatMul. The CPU plugin folds a Transpose in front of a MatMul into its fused
attention kernel; behind a FakeQuantize it ran as a node of its own: 12 more
Transposes than NNCF's model of timm's ViT-S/16, about 4 % of its time at batch 1.
"""
from __future__ import annotations

import numpy as np
import onnx

from .. import onnx_io, weight_pairs
from .ort_int8 import to_uint8_activations, whole_steps

PRODUCTS = ("MatMul", "Gemm", "Conv")
# Elementwise with scalar operands: they commute with any permutation of their input.
PER_TENSOR = ("Mul", "Div", "Clip", "QuantizeLinear", "DequantizeLinear")
SAFE_WEIGHT = 63  # 255 * 63 * 2 = 32130 <= 32767


def _fits_16_bit_sums(node, t: onnx.TensorProto) -> bool:
    """An int8 weight whose pairs of products with uint8 activations fit 16 bits: a Linear's
    made pair-safe (weight_pairs.py), or any product's within +-63."""
    if t.data_type != onnx.TensorProto.INT8:
        return False
    q = onnx_io.array(t)
    if int(np.abs(q.astype(np.int16)).max(initial=0)) <= SAFE_WEIGHT:
        return True
    trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    return node.op_type in ("MatMul", "Gemm") and q.ndim == 2 and weight_pairs.fits(q, 1 if trans_b else 0)


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
            if (w, node.op_type) not in safe:
                safe[(w, node.op_type)] = _fits_16_bit_sums(node, inits[w])
            return safe[(w, node.op_type)]
        return False  # no constant operand: an attention product

    def accept(dequantizers) -> bool:
        users = [u for dq in dequantizers for u in consumers.get(dq.output[0], [])]
        return bool(users) and all(u.op_type in PRODUCTS and weight_is_small(u) for u in users)
    return accept


def _scalar_shapes(model: onnx.ModelProto) -> dict[str, bool]:
    """{tensor: holds one value} for the tensors shape inference can tell."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # an unusual graph: no tensor is known scalar, nothing moves
        return {}
    out = {}
    for vi in list(inferred.value_info) + list(inferred.input):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = all(d.HasField("dim_value") and d.dim_value == 1 for d in t.shape.dim)
    for t in model.graph.initializer:
        out[t.name] = int(np.prod(t.dims)) == 1
    return out


def _swaps_last_two_axes(node) -> bool:
    """A K^T: what a MatMul takes in as its transpose_b. Hugging Face's K is permuted
    (0, 2, 3, 1), heads split and transposed at once; OpenVINO already fuses that one, and
    moving it measured 1-2 % slower in a probe on benchmarks/int8_peers.py's graphs (2026-11-28)."""
    if node.op_type != "Transpose":
        return False
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return perm is not None and len(perm) >= 2 and perm == [*range(len(perm) - 2), len(perm) - 1, len(perm) - 2]


def sink_attention_transposes(model: onnx.ModelProto) -> int:
    """K^T -> (Mul/Div/Clip/Q/DQ by scalars)... -> MatMul becomes
    (the same chain) -> K^T -> MatMul, in place; returns how many moved."""
    g = model.graph
    inits, producers, consumers = onnx_io.graph_index(model)
    outputs = {o.name for o in g.output}
    scalar = None
    moves = []
    for mm in g.node:
        if mm.op_type != "MatMul" or any(i in inits for i in mm.input):
            continue  # a weight product: no Transpose of an activation to move
        for slot, name in enumerate(mm.input):
            chain, node = [], producers.get(name)
            while node is not None and node.op_type in PER_TENSOR and len(consumers.get(node.output[0], [])) == 1:
                if scalar is None:
                    scalar = _scalar_shapes(model)
                if not all(scalar.get(i, False) for i in node.input[1:] if i):
                    break
                chain.append(node)
                node = producers.get(node.input[0])
            if chain and node is not None and _swaps_last_two_axes(node) and \
                    len(consumers.get(node.output[0], [])) == 1 and node.output[0] not in outputs:
                moves.append((mm, slot, chain, node))
    # the chain's tensors change shape: drop their recorded shapes
    stale = {n.output[0] for _, _, chain, t in moves for n in [*chain, t]}
    kept = [vi for vi in g.value_info if vi.name not in stale]
    del g.value_info[:]
    g.value_info.extend(kept)
    for mm, slot, chain, transpose in moves:
        chain[-1].input[0] = transpose.input[0]          # the chain now reads the untransposed tensor
        transpose.input[0] = chain[0].output[0]          # the Transpose reads the chain's end
        transpose.output[0] = transpose.output[0] + "_before_matmul"
        mm.input[slot] = transpose.output[0]
    if moves:  # each Transpose now reads a tensor produced after it
        nodes = onnx_io.toposort(list(g.node), {i.name for i in g.input} | set(inits))
        del g.node[:]
        g.node.extend(nodes)
    return len(moves)


def for_openvino(model: onnx.ModelProto) -> dict:
    """The rewrites, in place; returns what was done (for the manifest)."""
    return {"uint8_activations": to_uint8_activations(model, where=_small_weight_products(model)),
            "transposes_moved_to_attention": sink_attention_transposes(model)}


def _fake_quantized_source(output):
    """For a MatMul operand: the float tensor that a FakeQuantize -> Convert -> Convert
    [-> Subtract] -> Multiply chain (OpenVINO's reading of a Q/DQ pair), optionally behind a
    Transpose, dequantizes; with the Multiply whose output carries it. None otherwise."""
    node = output.get_node()
    while node.get_type_name() == "Transpose":
        node = node.input_value(0).get_node()
    dq = node
    if dq.get_type_name() != "Multiply":
        return None
    node = dq.input_value(0).get_node()
    if node.get_type_name() == "Subtract":
        node = node.input_value(0).get_node()
    for _ in range(2):  # Convert to float, then the Convert to int8/uint8 that OpenVINO reads Q as
        if node.get_type_name() != "Convert":
            return None
        node = node.input_value(0).get_node()
    return (dq, _unclipped(node)) if node.get_type_name() == "FakeQuantize" else None


def _constant_of(output):
    """The value of a Constant, through any Converts after it; None if `output` is not one."""
    node = output.get_node()
    while node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    return node.get_data() if node.get_type_name() == "Constant" else None


def _unclipped(fq):
    """What quantize._clip_operand's Clip reads, when the FakeQuantize `fq` reads that Clip
    (OpenVINO reads it as Maximum(-c, x) -> Minimum(c, .), the Minimum keeping the ONNX
    node's name, c a whole number of fq's steps); else fq's input. The Clip exists for the
    INT8 kernels alone: a product run in float has nothing to clip for (ort_int8.is_operand_clip
    is the same choice on the ONNX file)."""
    output = fq.input_value(0)
    low = output.get_node()
    if low.get_type_name() != "Minimum" or not low.get_friendly_name().endswith("_ClipOperand"):
        return output
    lows, highs = _constant_of(fq.input_value(1)), _constant_of(fq.input_value(2))
    if lows is None or highs is None or lows.size != 1 or highs.size != 1:
        return output
    step = (float(highs.reshape(())) - float(lows.reshape(()))) / (fq.get_levels() - 1)
    for i in range(2):
        high, top = low.input_value(1 - i).get_node(), _constant_of(low.input_value(i))
        if top is None or top.size != 1 or high.get_type_name() != "Maximum" or step <= 0:
            continue
        k = whole_steps(float(top.reshape(())), step)
        if k is None or k <= 0:
            continue
        for j in range(2):
            bottom = _constant_of(high.input_value(j))
            if bottom is not None and bottom.size == 1 and float(bottom.reshape(())) == -float(top.reshape(())):
                return high.input_value(1 - j)
    return output


def float_attention_products(model) -> int:
    """In an OpenVINO model read from the Q/DQ file, in place: each MatMul whose two operands
    are quantized activations (an attention product) reads them in float, as ONNX Runtime's
    form does (ort_int8.float_attention_products, the operand's Clip skipped too). Returns how many.

    Why: without VNNI the x86 INT8 kernels add pairs of u8 x s8 products in a saturating int16
    (OpenVINO's attention MatMul too: a 64-long row of 127 x 127 gave 8160 for 1032256 on an
    AVX2 EPYC, 2026-11-28), so the file gives their second operand 7 bits, which cost a
    trained Fashion-MNIST ViT's min cosine 0.99705 against 0.99868 with 8 bits and 0.99896 in
    float; there the float products are also the faster ones."""
    done = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        found = [_fake_quantized_source(op.input_value(i)) for i in range(2)]
        if all(found):
            for dq, source in found:
                dq.output(0).replace(source)
            done += 1
    return done


def _constant_equals(output, value: float) -> bool:
    c = _constant_of(output)
    return c is not None and bool(np.all(c == value))


def signed_activations(model) -> int:
    """In an OpenVINO model read from compile's IR, in place: each uint8 activation with zero
    point 128 (FakeQuantize to [0, 255] -> Convert u8 -> Convert f32 -> Subtract 128, what
    to_uint8_activations wrote) back to int8 with zero point 0. Exact: the same levels, shifted.
    Returns how many.

    Why: with VNNI the u8 form skips a shift per run (the reason for the rewrite); without it,
    OpenVINO 2026.4 runs the int8 form faster. AVX2 EPYC, 2026-11-29 06:51, benchmarks/
    int8_peers.py, paired against the faster NNCF file: 0.950-1.032 of its time on the eight
    stand-in graphs with this rewrite, 1.004-1.082 without it, measured beside it; per-node
    counters (ad hoc): the weight products as OpenVINO's FullyConnectedQuantizedLegacy
    (the kind NNCF's ONNX file gets), 80.2 ms for 48 on timm's ViT-S/16, against 83.4 ms as
    FullyConnected on u8. A first try (2026-11-28) was reverted over the real ViT's worst image,
    which turned out to be chance (README, "INT8 on a real trained ViT"); with GPTQ's weights
    that model's OpenVINO worst is 0.99806 in this form and 0.99630 in the u8 one."""
    import openvino.opset13 as ops
    done = 0
    for fq in model.get_ordered_ops():
        if fq.get_type_name() != "FakeQuantize" or fq.get_levels() != 256:
            continue
        users = [t.get_node() for t in fq.output(0).get_target_inputs()]
        if len(users) != 1 or users[0].get_type_name() != "Convert" or str(users[0].get_destination_type()) != "u8":
            continue
        if not (_constant_equals(fq.input_value(3), 0) and _constant_equals(fq.input_value(4), 255)):
            continue
        to_float = [t.get_node() for t in users[0].output(0).get_target_inputs()]
        subtracts = [[t.get_node() for t in c.output(0).get_target_inputs()] for c in to_float]
        if not to_float or any(c.get_type_name() != "Convert" or len(s) != 1 or s[0].get_type_name() != "Subtract"
                               or not _constant_equals(s[0].input_value(1), 128) for c, s in zip(to_float, subtracts)):
            continue
        low, high = (ops.constant(np.array(v, np.float32).reshape(fq.input_value(3).get_shape())) for v in (-128, 127))
        signed = ops.fake_quantize(fq.input_value(0), fq.input_value(1), fq.input_value(2), low, high, 256)
        as_float = ops.convert(ops.convert(signed, "i8"), "f32")
        for (sub,) in subtracts:
            sub.output(0).replace(as_float.output(0))
        done += 1
    return done


def for_cpus_without_vnni(model) -> dict:
    """The load-time rewrites for x86 CPUs without VNNI or AMX, in place; returns their counts."""
    return {"float_attention_products": float_attention_products(model),
            "signed_activations": signed_activations(model)}
