"""Stage: FP32 ONNX -> INT8 Q/DQ ONNX from calibration images.

The recipe (FQ-ViT, TinyNeuralNetwork and ModelOpt all point the same way):
explicit QuantizeLinear/DequantizeLinear on the inputs and weights of the
matrix products that have a weight (Gemm, MatMul with a constant, the patch
Conv); weights per output channel; everything symmetric with zero point 0,
which TensorRT requires. LayerNorm, Softmax, GELU, the residual Adds and the
classification head stay in floating point. One file serves ONNX Runtime,
OpenVINO and TensorRT (ONNX Runtime gets an exact uint8 form of it at compile
time: backends/ort_int8.py).

For the activations of trained ViTs, whose LayerNorm outputs carry a few channels
far larger than the rest (FQ-ViT, RepQ-ViT):
- outlier migration (SmoothQuant) folded into the LayerNorm's gamma and beta where
  every reader is a quantized Linear: exact in FP32 and free at run time
  (layernorm_scaling.py); the weights, quantized per output channel, take the range;
- a per-tensor clipping threshold chosen by the least expected squared quantization
  error on a histogram (`mse`, the default; calibration_stats.py) instead of a fixed
  percentile, which cut the outlier channels of a trained ViT-S (correlation 0.995
  against 0.9987 with minmax);
- bias correction: each quantized Linear's bias absorbs E[x] . (W - W_q), the mean
  shift that weight rounding causes;
- GPTQ weight rounding (weight_rounding.py): each Linear's rounding error carried onto
  its input rows not yet rounded, weighted by the calibration inputs' Gram matrix; the
  same scales and format as nearest rounding (models under 2 GB; vit-h14 keeps nearest).

The overflow fix: x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake)
multiply uint8 by int8 with VPMADDUBSW, which adds each pair of products into a
saturating int16; both CPU runtimes shift int8 activations to uint8 first. With
full-range weights the pairs overflow. Measured on an AVX2-only CPU (logit
cosine to FP32): OpenVINO INT8 vit-b16 0.924; vit-ti16 at 64 px 0.984 on ONNX
Runtime where the same Q/DQ arithmetic done exactly gives 0.995. Weights in
[-63, 63] (7 bits) cannot overflow, but double the weight rounding error (~0.001
of cosine). Only same-sign pairs of rows (2i, 2i+1) over 128 in all can, so the
fix keeps a Linear's weights at +-127 steps and pulls just those pairs back
(weight_pairs.py): the kernels then match the exact arithmetic on any CPU.
Convolutions (their input packed otherwise) and the second operand of the
attention products get 7 bits. `auto` applies the fix whenever a CPU runtime
may run the model and keeps plain 8-bit weights for TensorRT alone (GPUs do not
saturate); `first-layer` is NNCF's default (the layer that reads the image only).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import calibration_stats as cs
from . import onnx_io, weight_pairs, weight_rounding
from .errors import CheckFailed, UserError
from .images import list_images, load_images, split_for_calibration
from .metrics import correlation, cosine  # noqa: F401  (cosine: one definition, shared with the parity check)
from .zoo import Preprocessing
from .size_folding import fold_size_constants

log = logging.getLogger("vit_deploy")
METHODS = cs.METHODS
SCHEMES = ("symmetric", "centred", "asymmetric")
RECIPES = ("auto", "smoothquant", "plain")
WEIGHT_ROUNDINGS = ("gptq", "nearest")
SELECT_IMAGES = 8  # "auto" compares the recipes' outputs on this many held-out (else calibration) images
# "auto" keeps smoothquant (attention in INT8: the faster file) where its worst image correlates
# with FP32 at least this well, and only below it builds the plain recipe and keeps the better
GOOD_ENOUGH = 0.997
# the fidelity guard: below this worst-image correlation with FP32 (issue 11's line for a real
# trained ViT), "auto" returns the blocks that gain most to float, at most GUARD_SHARE of them
MIN_CORRELATION = 0.995
GUARD_SHARE = 0.5
GUARD_IMAGES = 16  # the guard judges on up to this many held-out (else calibration) images
OVERFLOW_FIXES = ("auto", "all", "first-layer", "off")
RECIPE = "auto-smoothquant-or-plain-centred-gptq-guard-v10"  # in the stage's cache key: a new recipe rebuilds old bundles
SMOOTH_ALPHA = 0.5  # SmoothQuant's strength where none is searched: max|x_j|^a / max|W_j|^(1-a)
MUL_GAIN = 0.5  # an explicit smoothing Mul must at least halve the Linear's output error to be worth its op


def resolve_overflow_fix(fix: str, runtimes=None) -> str:
    """`auto` -> `off` when only TensorRT will run the model, else `all` (see above)."""
    if fix not in OVERFLOW_FIXES:
        raise UserError(f"unknown overflow fix '{fix}': choose from {', '.join(OVERFLOW_FIXES)}")
    if fix != "auto":
        return fix
    return "off" if runtimes and set(runtimes) == {"tensorrt"} else "all"


@dataclass
class QTarget:
    node: str
    op_type: str
    activation: str      # the input tensor that gets Q/DQ
    weight: str | None   # the initializer that gets per-channel int8 (None: activation x activation)
    axis: int            # output-channel axis of the weight
    input_index: int = 0  # which input of `node` reads `activation`


@dataclass
class QuantResult:
    path: Path
    quantized: list[str]
    excluded: list[str]
    method: str
    calibration_images: list[str]
    held_out_images: list[str]
    report: list[dict] = field(default_factory=list)
    agreement: float | None = None
    cache_hit: bool = False
    seven_bit_weights: list[str] = field(default_factory=list)
    preprocessing: dict = field(default_factory=dict)
    preprocessing_source: str = ""
    smoothed_layernorms: int = 0
    smoothed_products: int = 0  # tensors smoothed by an explicit Mul (no LayerNorm before them)
    bias_corrected: int = 0
    attention_products: int = 0  # activation x activation MatMuls quantized
    recipe: str = "smoothquant"
    recipe_scores: dict = field(default_factory=dict)
    gptq_weights: int = 0  # weights rounded by GPTQ (the rest: nearest)
    fidelity: dict = field(default_factory=dict)  # the written model on the guard's images, where measured
    guarded: list[str] = field(default_factory=list)  # products the fidelity guard returned to float


def _initializers(model) -> dict:
    return {t.name: t for t in model.graph.initializer}


def find_targets(model, attention: bool = False) -> list[QTarget]:
    """Matrix products with a constant weight (and, with `attention`, the activation x
    activation MatMuls of self-attention)."""
    inits = _initializers(model)
    out = []
    for n in model.graph.node:
        if n.op_type == "Conv" and n.input[1] in inits:
            out.append(QTarget(n.name, "Conv", n.input[0], n.input[1], 0))
        elif n.op_type == "Gemm" and n.input[1] in inits:
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            out.append(QTarget(n.name, "Gemm", n.input[0], n.input[1], 0 if trans_b else 1))
        elif n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            out.append(QTarget(n.name, "MatMul", n.input[0], n.input[1], 1))
        elif n.op_type == "MatMul" and attention and n.input[0] not in inits and n.input[1] not in inits:
            out.append(QTarget(n.name, "MatMul", n.input[0], None, 0))
            out.append(QTarget(n.name, "MatMul", n.input[1], None, 0, input_index=1))
    return out


def default_exclusions(model, targets: list[QTarget]) -> set[str]:
    """The classification head (the matrix product whose output reaches the logits) and the
    convolutions of a CNN backbone (see backbone_convs)."""
    outputs = {o.name for o in model.graph.output}
    producers = {o: n for n in model.graph.node for o in n.output}
    excluded = set()
    frontier = list(outputs)
    seen = set()
    while frontier:  # walk back through shape-only ops to the head's Gemm
        t = frontier.pop()
        n = producers.get(t)
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        if n.op_type in ("Gemm", "MatMul"):
            excluded.add(n.name)
            continue
        # shape-only ops, and the averaging of two heads (DeiT distilled: (head + head_dist) / 2)
        if n.op_type in ("Add", "Reshape", "Flatten", "Squeeze", "Gather", "Identity", "Cast", "Div", "Mul"):
            frontier.extend(i for i in n.input)
    names = {t.node for t in targets}
    return (excluded | backbone_convs(model)) & names


def backbone_convs(model) -> set[str]:
    """Convolutions with another convolution downstream: a CNN backbone (the R50 hybrid's
    ResNet, the conv stages of edge hybrids), not a patch embedding. Kept in float: on the
    full-size R50+ViT-B/16 quantizing its 53 backbone convs held INT8 at cosine 0.977,
    float backbone convs gave 0.9988, for a few percent of the FLOPs."""
    _, _, consumers = onnx_io.graph_index(model)
    feeds_conv: dict[str, bool] = {}  # node name -> a Conv is downstream of its outputs
    for n in reversed(model.graph.node):  # ONNX keeps nodes in topological order
        feeds_conv[n.name] = any(c.op_type == "Conv" or feeds_conv.get(c.name, False)
                                 for o in n.output for c in consumers.get(o, []))
    return {n.name for n in model.graph.node if n.op_type == "Conv" and feeds_conv[n.name]}


def _cache_dir() -> Path:
    base = os.environ.get("VIT_DEPLOY_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                              os.path.expanduser("~/.cache"), "vit-deploy")
    return Path(base) / "calibration"


def _calib_key(model_sha: str, image_shas: list[str], method: str, pre: Preprocessing, tensors: list[str],
               smooth) -> str:
    blob = json.dumps(["stats-v6", model_sha, image_shas, method, pre.to_dict(), tensors, smooth,
                       cs.PERCENTILE, cs.BINS, ALPHAS, MUL_ALPHAS, MUL_GAIN])  # the smoothing factors depend on these
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _save_calibration(path: Path, stats: dict, thresholds: dict, factors: dict) -> None:
    """npz, read back without pickle (allow_pickle=False)."""
    from .atomic import atomic_path
    names = list(stats)
    arrays = {"names": np.array(names), "thresholds": np.array([thresholds[t] for t in names])}
    for i, t in enumerate(names):
        for k, v in stats[t].to_json().items():
            arrays[f"{i}.{k}"] = np.asarray(v)
    groups = list(factors)
    arrays["groups"] = np.array(groups)
    for i, g in enumerate(groups):
        arrays[f"g{i}"] = factors[g]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _load_calibration(path: Path):
    with np.load(path, allow_pickle=False) as z:
        names = [str(n) for n in z["names"]]
        stats = {t: cs.ChannelStats(*(z[f"{i}.{k}"] for k in ("amax", "lo", "hi", "mean"))) for i, t in enumerate(names)}
        thresholds = dict(zip(names, (float(x) for x in z["thresholds"])))
        factors = {str(g): z[f"g{i}"] for i, g in enumerate(z["groups"])}
    return stats, thresholds, factors


# ------------------------------------------------------------- outlier migration and bias correction

# "auto" tries these per tensor (None: no migration); the Muls also 0.8 and 0.95. Those two
# on the LayerNorms too cost a random vit-ti16 at 32 px 0.9939 -> 0.9872 of min cosine.
ALPHAS = (None, 0.3, 0.5, 0.7, 0.9)
MUL_ALPHAS = (None, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


def _smoothing(x_max, w_max, alpha):
    if alpha is None:
        return np.ones_like(x_max)
    s = np.where((x_max > 0) & (w_max > 0),
                 np.power(np.maximum(x_max, 1e-12), alpha) / np.power(np.maximum(w_max, 1e-12), 1 - alpha), 1.0)
    return np.clip(s, 1e-4, 1e4)


def _product_error(x: np.ndarray, w: np.ndarray, s: np.ndarray, x_amax: float, top) -> float:
    """Relative squared error of x @ w when x / s is quantized per tensor (MSE threshold)
    and w * s per output column: what one migration choice costs the Linear outputs."""
    x, w, s = x.astype(np.float32), w.astype(np.float32), s.astype(np.float32)  # one dtype: BLAS, not a loop
    xs, ws = x / s, w * s[:, None]
    hist = np.bincount(np.minimum((np.abs(xs).ravel() * (512 / x_amax)).astype(np.int64), 511), minlength=512)
    step = cs.mse_threshold(hist, x_amax) / cs.LEVELS
    xq = np.clip(np.round(xs / step), -128, 127) * step
    # plain +-127 stands in for the pair-safe weights here: within a few percent of their
    # error, and the search calls this for every strength of every tensor (5x cheaper)
    wq, scale = quantize_weight(ws.astype(np.float32), 1, 127 if top == PAIR_SAFE else top)
    ref = x @ w
    return float(np.sum((ref - xq @ (wq * scale[None, :])) ** 2) / max(np.sum(ref ** 2), 1e-30))


def _smoothing_groups(model: onnx.ModelProto):
    """[(group, tag)]: the LayerNorms (free) first, then the tensors that need a Mul."""
    from .layernorm_scaling import find_groups, find_product_inputs
    norms = find_groups(model)
    muls = find_product_inputs(model, skip={g.output for g in norms})
    return [(g, f"smooth{i}") for i, g in enumerate(norms)] + [(g, f"smoothmul{i}") for i, g in enumerate(muls)]


def _layernorm_outputs(model: onnx.ModelProto) -> list[str]:
    from .layernorm_scaling import find_groups
    return [g.output for g in find_groups(model)]


def smoothable_tensors(model: onnx.ModelProto) -> list[str]:
    return [g.output for g, _ in _smoothing_groups(model)]


def smooth_layernorms(model: onnx.ModelProto, stats: dict, samples: dict, quantized_weights: set[str], alpha,
                      weight_top=127, in_place: bool = False):
    """SmoothQuant: where every reader of a tensor is a quantized Linear, divide channel j
    by s_j = max|x_j|^a / max|W_j|^(1-a) and multiply the readers' weight rows by it.
    After a LayerNorm it goes into gamma and beta (free at run time); elsewhere (fc2,
    the attention projection) into a Mul before the quantizer, which costs one
    elementwise op, so "auto" takes it there only where it at least halves the error.
    Exact in FP32. alpha "auto" picks, per tensor, the strength (or none) whose
    quantized Linear outputs err least on a sample of calibration rows: trained ViTs
    differ per layer. Returns the new model, the statistics of the smoothed tensors
    and {tensor: s}."""
    from .layernorm_scaling import reader_weights, scale_channels
    out = model if in_place else _copy(model)
    stats = dict(stats)
    factors = {}
    for group, tag in _smoothing_groups(out):
        nodes = {n.name: n for n in out.graph.node}
        if group.output not in stats or not all(nodes[r[0]].input[1] in quantized_weights for r in group.readers):
            continue
        w = np.concatenate(reader_weights(out, group), axis=1)  # [in, sum of outs]
        x_max = stats[group.output].amax
        w_max = np.abs(w).max(axis=1)
        if x_max.shape != w_max.shape:
            continue
        if alpha == "auto" and group.output in samples:
            # the error on 512 sampled rows and 512 sampled output columns: each column's
            # weights are quantized on their own, so a column subset estimates it unbiased
            x = samples[group.output][:cs.SAMPLE_ROWS]
            cols = np.random.default_rng(len(factors)).choice(w.shape[1], min(512, w.shape[1]), replace=False)
            errs = {a: _product_error(x, w[:, cols], _smoothing(x_max, w_max, a),
                                      float((x_max / _smoothing(x_max, w_max, a)).max()), weight_top)
                    for a in (ALPHAS if group.gamma is not None else MUL_ALPHAS)}
            best = min(errs, key=errs.get)
            if group.gamma is None and errs[best] > MUL_GAIN * errs[None]:
                best = None
        elif alpha == "auto":
            best = SMOOTH_ALPHA if group.gamma is not None else None
        else:
            best = alpha
        if best is None:
            continue
        s = _smoothing(x_max, w_max, best)
        scale_channels(out, group, 1.0 / s, tag)
        stats[group.output] = stats[group.output].divided(s)
        factors[group.output] = s
        quantized_weights = quantized_weights | {n.input[1] for n in out.graph.node if n.name in {r[0] for r in group.readers}}
    return out, stats, factors


def apply_factors(model: onnx.ModelProto, stats: dict, factors: dict, in_place: bool = False):
    """Re-apply cached smoothing factors {tensor: s} (same math as smooth_layernorms)."""
    from .layernorm_scaling import scale_channels
    out = model if in_place else _copy(model)
    stats = dict(stats)
    for group, tag in _smoothing_groups(out):
        if group.output in factors:
            s = np.asarray(factors[group.output], np.float64)
            scale_channels(out, group, 1.0 / s, tag)
            stats[group.output] = stats[group.output].divided(s)
    return out, stats


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


PAIR_SAFE = "pairs"  # a weight level: +-127 steps, safe for 16-bit pair sums (see weight_pairs)


_PAIR_SAFE_MEMO: dict = {}  # the pair-safe search is slow and one build asks for each weight up to 4 times
_PAIR_SAFE_MEMO_BYTES = 256 << 20


def quantize_weight(w: np.ndarray, axis: int, top) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 in [-top, top] (or PAIR_SAFE): (int8 values, per-channel scale)."""
    if top == PAIR_SAFE:
        w = np.ascontiguousarray(w, np.float32)
        key = (w.shape, axis, hashlib.blake2b(w.data, digest_size=16).digest())
        if key not in _PAIR_SAFE_MEMO:
            if sum(q.nbytes for q, _ in _PAIR_SAFE_MEMO.values()) + w.size > _PAIR_SAFE_MEMO_BYTES:
                _PAIR_SAFE_MEMO.clear()
            _PAIR_SAFE_MEMO[key] = weight_pairs.quantize_pair_safe(w, axis)
        q, scale = _PAIR_SAFE_MEMO[key]
        return q.copy(), scale.copy()
    red = tuple(i for i in range(w.ndim) if i != axis)
    scale = np.maximum(np.abs(w).max(axis=red), 1e-12) / top
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -top, top).astype(np.int8)
    return q, scale.astype(np.float32)


def _weight_steps(t: QTarget, w: np.ndarray, levels: dict, rounded: dict | None):
    """(int8 values, scale) of a target's weight: GPTQ's where it was rounded so, else nearest."""
    if rounded and t.weight in rounded:
        q, scale = rounded[t.weight]
        return q.copy(), scale.copy()
    return quantize_weight(w, t.axis, levels.get(t.weight, 127))


def gptq_weights(model: onnx.ModelProto, targets: list[QTarget], levels: dict, calib: np.ndarray) -> dict:
    """{weight: (int8 values, scale)} rounded by GPTQ (weight_rounding.py) for the Linear
    weights of `targets`, from the Gram matrices of their inputs over `calib` in `model`
    (the graph being quantized: smoothed or not). Scales and ranges are nearest rounding's."""
    inits = _initializers(model)
    readers: dict[str, list[QTarget]] = {}
    widths: dict[str, int] = {}
    for t in targets:
        if t.weight is None or t.op_type not in ("MatMul", "Gemm") or len(inits[t.weight].dims) != 2:
            continue
        readers.setdefault(t.activation, []).append(t)
        widths[t.activation] = int(inits[t.weight].dims[1 - t.axis])  # the input axis
    rounded = {}
    for grams in cs.collect_grams(model, widths, calib):
        for tensor, gram in grams.items():
            order, u = weight_rounding.factor_in_order(gram) if gram.shape[0] == widths[tensor] else (None, None)
            for t in readers[tensor] if u is not None else ():
                if t.weight in rounded:
                    continue
                w = onnx_io.array(inits[t.weight]).astype(np.float32)
                level = levels.get(t.weight, 127)
                _, scale = quantize_weight(w, t.axis, level)
                rows = w if t.axis == 1 else w.T  # [in, out]
                q = weight_rounding.round_in_order(rows, scale, u, order, pair_safe=level == PAIR_SAFE)
                rounded[t.weight] = (q if t.axis == 1 else np.ascontiguousarray(q.T), scale)
    return rounded


def _constant(name, producers, inits):
    """The initializer behind `name`, looking through Identity nodes (torch's exporter
    writes one initializer and an Identity per reader when several biases are equal)."""
    while name not in inits and name in producers and producers[name].op_type == "Identity":
        name = producers[name].input[0]
    return name if name in inits else None


def _bias_ref(node, producers, consumers, inits):
    """(node, input index, initializer) of a product's constant bias: Gemm/Conv input 2,
    or the Add after a MatMul."""
    if node.op_type in ("Gemm", "Conv"):
        init = _constant(node.input[2], producers, inits) if len(node.input) > 2 else None
        return (node, 2, init) if init else None
    after = consumers.get(node.output[0], [])
    if len(after) == 1 and after[0].op_type == "Add":
        add = after[0]
        other = 1 if add.input[0] == node.output[0] else 0
        init = _constant(add.input[other], producers, inits)
        if init and len(inits[init].dims) == 1:
            return (add, other, init)
    return None


def correct_biases(model: onnx.ModelProto, targets: list[QTarget], stats: dict, levels: dict,
                   rounded: dict | None = None) -> int:
    """Bias correction (in place): the weight rounding error shifts each output channel's
    mean by E[x] . (W - W_q); add that back to the bias. Returns how many were corrected."""
    inits, producers, consumers = onnx_io.graph_index(model)
    nodes = {n.name: n for n in model.graph.node}
    done = 0
    for t in targets:
        if t.weight is None or t.activation not in stats:
            continue
        ref = _bias_ref(nodes[t.node], producers, consumers, inits)
        mean = stats[t.activation].mean
        w = onnx_io.array(inits[t.weight]).astype(np.float64)
        q, scale = _weight_steps(t, w.astype(np.float32), levels, rounded)
        shape = [1] * w.ndim
        shape[t.axis] = -1
        dw = w - q.astype(np.float64) * scale.reshape(shape)
        if ref is None:
            continue
        if t.op_type == "Conv":
            if mean.shape[0] != dw.shape[1]:
                continue
            shift = dw.sum(axis=(2, 3)) @ mean
        elif t.axis == 0:  # Gemm transB: [out, in]
            if mean.shape[0] != dw.shape[1]:
                continue
            shift = dw @ mean
        else:              # [in, out]
            if mean.shape[0] != dw.shape[0]:
                continue
            shift = mean @ dw
        node, idx, init = ref
        bias = onnx_io.array(inits[init]).astype(np.float64)
        if bias.shape != shift.shape:
            continue
        name = f"{_safe(node.name)}_{idx}_bias_corrected"  # per node: one bias may be shared by several
        model.graph.initializer.append(numpy_helper.from_array((bias + shift).astype(np.float32), name))
        node.input[idx] = name
        done += 1
    onnx_io.drop_dead_nodes(model)  # Identity nodes of shared biases no product reads any more
    onnx_io.drop_unused_initializers(model)
    return done


# ------------------------------------------------------------- graph rewrite

def _qdq_pair(graph_nodes, init_list, tensor: str, scale: np.ndarray, axis: int | None, tag: str,
              zero_point: np.ndarray | None = None) -> str:
    """Append Q -> DQ on `tensor`; returns the dequantized tensor's name."""
    s_name, z_name = f"{tag}_scale", f"{tag}_zero_point"
    init_list.append(numpy_helper.from_array(scale.astype(np.float32), s_name))
    zp = np.zeros(scale.shape, np.int8) if zero_point is None else zero_point
    init_list.append(numpy_helper.from_array(zp, z_name))
    kw = {} if axis is None else {"axis": axis}
    q, dq = f"{tag}_quantized", f"{tag}_dequantized"
    graph_nodes.append(helper.make_node("QuantizeLinear", [tensor, s_name, z_name], [q], name=f"{tag}_QuantizeLinear", **kw))
    graph_nodes.append(helper.make_node("DequantizeLinear", [q, s_name, z_name], [dq], name=f"{tag}_DequantizeLinear", **kw))
    return dq


def _clip_operand(graph_nodes, init_list, tensor: str, scale: float, levels: int, tag: str) -> str:
    """Clip(x, -levels s, levels s) before the second operand of an activation x activation
    product (the attention MatMuls). QuantizeLinear alone reaches -128 and, with a 7-bit
    scale, +-127 steps; the CPU kernels take this operand as their signed "weight" side:
    - with both operands able to reach -128, a -128 x -128 pair overflows the 16-bit sums
      of ARM INT8 kernels without dot product (ONNX Runtime gave -65 for +65 on an emulated
      Cortex-A72): +-127 is enough there;
    - x86 without VNNI adds pairs of u8 x s8 products into a saturating int16, as for the
      weights (the overflow fix): under it this operand gets 7 bits, +-63."""
    lo, hi = f"{tag}_clip_min", f"{tag}_clip_max"
    init_list += [numpy_helper.from_array(np.array(-levels * scale, np.float32), lo),
                  numpy_helper.from_array(np.array(levels * scale, np.float32), hi)]
    out = f"{tag}_clipped"
    graph_nodes.append(helper.make_node("Clip", [tensor, lo, hi], [out], name=f"{tag}_ClipOperand"))
    return out


def activation_qparams(clip: float, lo: float, hi: float, scheme: str,
                       levels: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of one activation tensor.

    symmetric: int8, zero point 0, range [-clip, clip] on +-levels steps (what TensorRT requires).
    asymmetric: uint8 over [max(min, -clip), min(max, clip)], so a one-sided
    tensor (GELU's output) gets all 256 levels; CPU runtimes only."""
    if scheme == "symmetric":
        return np.array(max(clip, 1e-8) / levels, np.float32), np.array(0, np.int8)
    lo_c, hi_c = min(max(lo, -clip), 0.0), max(min(hi, clip), 0.0)
    scale = max(hi_c - lo_c, 1e-8) / 255.0
    zp = int(np.clip(np.round(-lo_c / scale), 0, 255))
    return np.array(scale, np.float32), np.array(zp, np.uint8)


def first_layer(model: onnx.ModelProto, targets: list[QTarget]) -> list[QTarget]:
    """The matrix products that read the image (the graph input) with no other
    matrix product before them: ViT's patch embedding, the hybrid's stem conv."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inputs = {i.name for i in model.graph.input}
    products = ("Conv", "Gemm", "MatMul", "ConvInteger", "MatMulInteger")
    cache: dict[str, bool] = {}

    def fed_by_input_only(tensor: str) -> bool:
        if tensor in cache:
            return cache[tensor]
        cache[tensor] = False  # guards against cycles
        n = producers.get(tensor)
        # Shape and Size carry the input's dimensions, not its pixels: a DINOv2 graph resizes its
        # position grid from them, and every LayerNorm looked "fed by the image" through it
        ok = tensor in inputs if n is None else (n.op_type not in products + ("Shape", "Size") and
                                                 any(fed_by_input_only(i) for i in n.input if i))
        cache[tensor] = ok
        return ok
    return [t for t in targets if t.weight is not None and fed_by_input_only(t.activation)]


def first_block(model: onnx.ModelProto, targets: list[QTarget]) -> list[QTarget]:
    """The Linears of the first transformer block: with one Softmax per attention block,
    the first (Linears / blocks) Linears in graph order (ONNX keeps nodes in topological
    order, and exporters write a block's layers together). [] without a Softmax."""
    blocks = sum(n.op_type == "Softmax" for n in model.graph.node)
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    linears = sorted({t.node for t in targets if t.weight is not None and t.op_type != "Conv"}, key=order.get)
    if not blocks or len(linears) < blocks:
        return []
    first = set(linears[:len(linears) // blocks])
    return [t for t in targets if t.node in first]


def weight_levels(model: onnx.ModelProto, targets: list[QTarget], overflow_fix: str) -> dict:
    """The int8 range per weight tensor where the (resolved) overflow fix applies: PAIR_SAFE
    for a Linear's 2-D weight, 63 for a convolution's; tensors not listed keep +-127."""
    fixed = first_layer(model, targets) if overflow_fix == "first-layer" else targets if overflow_fix == "all" else []
    return {t.weight: PAIR_SAFE if t.op_type in ("MatMul", "Gemm") else 63 for t in fixed if t.weight is not None}


def insert_qdq(model: onnx.ModelProto, targets: list[QTarget], ranges: dict[str, list[float]],
               scheme: str = "symmetric", levels: dict | None = None,
               in_place: bool = False, operand_levels: int = 127, rounded: dict | None = None) -> onnx.ModelProto:
    """Q/DQ on each target's activation (per tensor) and weight (per channel, int8, symmetric;
    `levels` gives some weights 7 bits or pair-safe 8 bits, see the overflow fix above; `operand_levels` does the
    same for the second operand of activation x activation products, see _clip_operand)."""
    inits = _initializers(model)
    new_nodes, new_inits = [], []
    centres = _centres(model, targets, ranges, levels or {}, rounded) if scheme == "centred" else {}
    act_dq: dict[str, str] = {}
    weight_dq: dict[str, str] = {}
    rewire: dict[tuple[str, int], str] = {}
    for t in targets:
        if t.activation not in act_dq:
            second = t.weight is None and t.input_index == 1 and scheme != "asymmetric"
            src = t.activation
            if t.activation in centres:
                c, scale = centres[t.activation]
                scale, zp = np.array(scale, np.float32), np.array(0, np.int8)
                tag = _safe(t.activation) + "_centre"
                new_inits.append(numpy_helper.from_array(np.array(c, np.float32), tag))
                new_nodes.append(helper.make_node("Sub", [src, tag], [tag + "d"], name=tag + "_Sub"))
                src = tag + "d"
            else:
                scale, zp = activation_qparams(*ranges[t.activation], "symmetric" if scheme == "centred" else scheme,
                                               operand_levels if second else 127)
            if second:
                src = _clip_operand(new_nodes, new_inits, src, float(scale), operand_levels, _safe(src))
            act_dq[t.activation] = _qdq_pair(new_nodes, new_inits, src, scale, None, _safe(t.activation), zp)
        rewire[(t.node, t.input_index)] = act_dq[t.activation]
        if t.weight is not None:
            if t.weight not in weight_dq:
                w = onnx_io.array(inits[t.weight]).astype(np.float32)
                q, scale = _weight_steps(t, w, levels or {}, rounded)
                tag = _safe(t.weight)
                qname, s_name, z_name = f"{tag}_int8", f"{tag}_scale", f"{tag}_zero_point"
                new_inits += [onnx_io.tensor(q, qname),
                              numpy_helper.from_array(scale, s_name),
                              numpy_helper.from_array(np.zeros(scale.shape, np.int8), z_name)]
                dq = f"{tag}_dequantized"
                new_nodes.append(helper.make_node("DequantizeLinear", [qname, s_name, z_name], [dq],
                                                  name=f"{tag}_DequantizeLinear", axis=t.axis))
                weight_dq[t.weight] = dq
            rewire[(t.node, 1)] = weight_dq[t.weight]
    out = model if in_place else _copy(model)
    g = out.graph
    for n in g.node:
        for i in range(len(n.input)):
            if (n.name, i) in rewire:
                n.input[i] = rewire[(n.name, i)]
    # Q/DQ nodes must precede their consumers: put them first (their inputs are
    # graph inputs, initializers or produced earlier), then topologically sort.
    nodes = onnx_io.toposort(list(g.node) + new_nodes, {i.name for i in g.input} | {t.name for t in g.initializer} |
                      {t.name for t in new_inits})
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    if out.opset_import[0].version < 13:
        raise UserError("per-channel Q/DQ needs opset >= 13")
    return out


def _centre_of(clip: float, lo: float, hi: float) -> tuple[float, float] | None:
    """(c, step) of the centred scheme for a tensor in [lo, hi] clipped to +-clip: c the
    middle, a whole number of steps; None where the range is about symmetric already
    (off centre by less than 5 %: a Sub for nothing)."""
    lo, hi = max(lo, -clip), min(hi, clip)
    c = (lo + hi) / 2
    if abs(c) < 0.05 * max(hi - lo, 1e-12):
        return None
    step = float(np.float32(max((hi - lo) / 2, 1e-8) / 126.5))  # half a step spare for rounding c
    return float(np.float32(round(c / step) * step)), step


def _centres(model: onnx.ModelProto, targets: list[QTarget], ranges: dict,
             levels: dict, rounded: dict | None = None) -> dict[str, tuple[float, float]]:
    """The "centred" scheme (in place on the readers' biases): quantize x - c, c the middle of
    x's range, symmetrically with zero point 0, and add c * (sum of each weight column) to
    the bias. Exact, and TensorRT-valid, yet it spends all 256 levels on a one-sided tensor
    (GELU's output, which fc2 reads), as an asymmetric uint8 would. Only where every
    quantized reader is a Linear (one without a bias gets one to take the shift) and the
    range is off centre by 5 % or more; the others stay plain symmetric.
    c is a whole number k of quantization steps, so a CPU runtime form can drop the Sub and
    quantize x itself with zero point 128 - k (ort_int8.to_uint8_activations): the same
    integers. Returns {tensor: (c, scale)}."""
    inits, producers, consumers = onnx_io.graph_index(model)
    nodes = {n.name: n for n in model.graph.node}
    readers: dict[str, list[QTarget]] = {}
    for t in targets:
        readers.setdefault(t.activation, []).append(t)
    centres = {}
    for tensor, ts in readers.items():
        centre = _centre_of(*ranges[tensor])
        if centre is None or any(t.weight is None or t.op_type == "Conv" for t in ts):
            continue
        c, step = centre
        for t in ts:
            w = onnx_io.array(inits[t.weight]).astype(np.float32)
            q, scale = _weight_steps(t, w, levels, rounded)
            wq = q.astype(np.float64) * (scale[None, :] if t.axis == 1 else scale[:, None])
            shift = c * wq.sum(axis=0 if t.axis == 1 else 1)  # the int8 product sees x - c
            node = nodes[t.node]
            ref = _bias_ref(node, producers, consumers, inits)
            name = f"{_safe(node.name)}_bias_centred"
            if ref is not None:
                add, idx, init = ref
                shift = shift + onnx_io.array(inits[init]).astype(np.float64)
                add.input[idx] = name
            elif t.op_type == "Gemm":
                node.input.extend([""] * (3 - len(node.input)))
                node.input[2] = name
            else:  # a MatMul without a bias (vit-deploy's own export): give it one
                out = node.output[0]
                node.output[0] = out + "_uncentred"
                model.graph.node.append(helper.make_node("Add", [node.output[0], name], [out], name=name + "_Add"))
            model.graph.initializer.append(numpy_helper.from_array(shift.astype(np.float32), name))
            inits[name] = model.graph.initializer[-1]
        centres[tensor] = (c, step)
    return centres


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in name).strip("_") or "t"


# ------------------------------------------------------------- evaluation

def _run(model: onnx.ModelProto, images: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    m = model
    if outputs:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        cs.add_outputs(m, outputs)
    sess = cs.session(m)
    names = [o.name for o in sess.get_outputs()]
    collected = [[] for _ in names]
    for batch in cs.batches(images, cs.fixed_batch(sess) or 8):
        for j, o in enumerate(cs.run_batch(sess, batch)):
            collected[j].append(o)
    return [np.concatenate(c) for c in collected]


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())




def layer_report(fp32: onnx.ModelProto, int8: onnx.ModelProto, targets: list[QTarget], excluded: set[str],
                 images: np.ndarray) -> list[dict]:
    """Each matrix product: quantized or not, and its output error against FP32."""
    nodes = {n.name: n for n in fp32.graph.node}
    outs = list(dict.fromkeys(nodes[t.node].output[0] for t in targets))
    ref = dict(zip([o.name for o in fp32.graph.output] + outs, _run(fp32, images, outs)))
    got = dict(zip([o.name for o in int8.graph.output] + outs, _run(int8, images, outs)))
    rows = []
    for t in dict((t.node, t) for t in targets).values():
        name = t.node
        o = nodes[name].output[0]
        a, b = ref[o], got[o]
        rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
        rows.append({"node": name, "op": t.op_type, "quantized": name not in excluded, "output": o,
                     "rel_error": rel, "max_abs_error": float(np.abs(a - b).max())})
    return rows


def format_report(rows: list[dict]) -> str:
    lines = [f"{'node':<48} {'op':<7} {'int8':<5} {'rel err':>9} {'max abs':>9}"]
    for r in rows:
        lines.append(f"{r['node'][:48]:<48} {r['op']:<7} {'yes' if r['quantized'] else 'no':<5} "
                     f"{r['rel_error']:>9.4f} {r['max_abs_error']:>9.4f}")
    return "\n".join(lines)


# ------------------------------------------------------------- the stage

def _check_image_input(model: onnx.ModelProto, name: str) -> None:
    """Calibration and the checks feed float32 images as [batch, 3, H, W]: one line for a file
    made otherwise (uint8 pixels, channels last, not an image model)."""
    inp = model.graph.input[0] if model.graph.input else None
    elem = inp.type.tensor_type.elem_type if inp is not None else 0
    dims = [d.dim_value or d.dim_param or "?" for d in inp.type.tensor_type.shape.dim] if inp is not None else []
    if elem != onnx.TensorProto.FLOAT or len(dims) != 4 or isinstance(dims[1], int) and dims[1] != 3:
        kind = onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "missing"
        raise UserError(f"{name}: input '{inp.name if inp is not None else ''}' is {kind} [{'x'.join(map(str, dims))}]"
                        ", not a 4-D image tensor of float32 [batch, 3, H, W]")


def preprocessing_of(model: onnx.ModelProto, model_path=None, img_size=None, mean=None, std=None,
                     preset=None) -> tuple[Preprocessing, str]:
    """The model's preprocessing and where it came from (see vit_deploy/preprocessing.py)."""
    from .preprocessing import resolve
    _check_image_input(model, Path(model_path or "model.onnx").name)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    meta = onnx_io.get_metadata(model).get("preprocessing")
    return resolve(Path(model_path or "model.onnx"), meta, dims[2].dim_value or None, img_size, mean, std, preset)


def calibrate(model, targets, excluded, calib, method: str, smooth, cache_key: str | None,
              recalibrate: bool = False, in_place: bool = False, weight_top=127):
    """Statistics, outlier migration and clipping thresholds for the quantized tensors.
    Returns (smoothed model, statistics, {tensor: threshold}, {tensor: s}, cache hit,
    statistics before smoothing).
    `in_place` smooths `model` itself: one copy of the weights less (vit-h14: 2.5 GB)."""
    tensors = list(dict.fromkeys(t.activation for t in targets))
    cache = _cache_dir() / f"{cache_key}.npz" if cache_key else None
    if cache and cache.is_file() and not recalibrate:
        try:
            stats0, thresholds, factors = _load_calibration(cache)
            smoothed, stats = apply_factors(model, stats0, factors, in_place)
            log.info("calibration: reusing cached statistics (%s)", cache.name)
            return smoothed, stats, thresholds, factors, True, stats0
        except (OSError, ValueError, KeyError):
            log.warning("calibration cache %s is unreadable; recalibrating", cache.name)
    sampled = tuple(smoothable_tensors(model)) if smooth == "auto" else ()
    stats0, samples = cs.collect_channel_stats(model, tensors, calib, sampled)
    smoothed, stats, factors = model, stats0, {}
    if smooth:
        quantized = {t.weight for t in targets if t.weight and t.node not in excluded}
        smoothed, stats, factors = smooth_layernorms(model, stats0, samples, quantized, smooth, weight_top, in_place)
    amax = {t: float(stats[t].amax.max()) for t in tensors}
    hists = cs.collect_histograms(smoothed, tensors, calib, amax) if method != "minmax" else {}
    thresholds = {t: cs.threshold(method, hists.get(t), amax[t]) for t in tensors}
    if cache:
        _save_calibration(cache, stats0, thresholds, factors)
    return smoothed, stats, thresholds, factors, False, stats0


def quantize(model_path, calib_dir, out=None, method: str = "mse", exclude=(), calib_size: int = 32,
             max_drop: float | None = None, img_size=None, mean=None, std=None, preset: str | None = None,
             attention: bool = True, report: bool = False, recalibrate: bool = False, scheme: str = "symmetric",
             overflow_fix: str = "auto", smooth="auto",
             bias_correction: bool = True, recipe: str = "auto", weight_rounding: str = "gptq",
             min_correlation: float | None = MIN_CORRELATION) -> QuantResult:
    """Quantize an FP32 ViT ONNX model to a Q/DQ INT8 model (see the module docstring).
    `min_correlation`: the fidelity guard of the auto recipe (guard_fidelity); None or 0: off."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise UserError(f"model not found: {model_path}")
    if scheme not in SCHEMES:
        raise UserError(f"unknown scheme '{scheme}': choose from {', '.join(SCHEMES)}")
    if recipe not in RECIPES:
        raise UserError(f"unknown recipe '{recipe}': choose from {', '.join(RECIPES)}")
    if weight_rounding not in WEIGHT_ROUNDINGS:
        raise UserError(f"unknown weight rounding '{weight_rounding}': choose from {', '.join(WEIGHT_ROUNDINGS)}")
    if method not in METHODS:
        raise UserError(f"unknown calibration method '{method}': choose from {', '.join(METHODS)}")
    if min_correlation is not None and not 0 <= min_correlation < 1:
        raise UserError(f"--min-correlation takes a number in [0, 1), got {min_correlation}")
    if calib_size < 1:
        raise UserError(f"--calib-size must be at least 1, got {calib_size}")
    if smooth not in (None, "auto") and not (isinstance(smooth, (int, float)) and 0 < smooth < 1):
        raise UserError(f"--smooth must be 'auto' or a number between 0 and 1 (exclusive), got {smooth}")
    overflow_fix = resolve_overflow_fix(overflow_fix)  # the manifest records what was done, never "auto"
    try:
        model = onnx_io.load_working(model_path)  # a large model's weights stay in their file: see onnx_io
    except Exception as e:
        raise UserError(f"{model_path}: not a readable ONNX model ({type(e).__name__})") from None
    # A model with external weights (vit-h14) keeps them on disk throughout: each tensor
    # is read, rewritten and written on its own, so memory holds one at a time.
    with onnx_io.spill_weights(onnx_io.has_external(model)):
        return _quantize_loaded(model, model_path, calib_dir, out, method=method, exclude=exclude,
                                calib_size=calib_size, max_drop=max_drop, img_size=img_size, mean=mean, std=std,
                                preset=preset, attention=attention, report=report, recalibrate=recalibrate,
                                scheme=scheme, overflow_fix=overflow_fix, smooth=smooth,
                                bias_correction=bias_correction, recipe=recipe, weight_rounding=weight_rounding,
                                min_correlation=min_correlation)


def _check_float32_weights(model, model_path: Path) -> None:
    """An FP16 export would fail deep in calibration: say so in one line."""
    half = {t.data_type for t in model.graph.initializer if onnx_io.tensor_bytes(t) >= 1024} & \
        {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    if half:
        raise UserError(f"{model_path.name}: its weights are {onnx.TensorProto.DataType.Name(min(half)).lower()}; "
                        "quantize takes an FP32 ONNX model (export it in float32)")


QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearMatMul", "QLinearConv",
                 "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "MatMulNBits", "QAttention", "QGemm")


def _check_not_quantized(model, model_path: Path) -> None:
    """A file another tool (or vit-deploy) already quantized: calibrating it again found no
    float weights and wrote "0 matrix products in INT8" as a success. Say so in one line."""
    found = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    if found:
        raise UserError(f"{model_path.name} is already quantized (it has {', '.join(found)} nodes); quantize takes "
                        "the FP32 model it came from")


def _quantize_loaded(model, model_path: Path, calib_dir, out, *, method, exclude, calib_size, max_drop, img_size,
                     mean, std, preset, attention, report, recalibrate, scheme, overflow_fix, smooth,
                     bias_correction, recipe, weight_rounding, min_correlation) -> QuantResult:
    from .weights import sha256_file

    _check_not_quantized(model, model_path)
    _check_float32_weights(model, model_path)
    pre, pre_source = preprocessing_of(model, model_path, img_size, mean, std, preset)
    folded = fold_size_constants(model, pre.img_size)  # the INT8 file is for one image size anyway
    if folded:
        log.info("size folding: %d value(s) computed from shapes alone are constants at %d px", folded, pre.img_size)
    targets = find_targets(model, attention)
    if not any(t.weight is not None for t in targets):
        raise UserError(f"{model_path.name}: no matrix product with a constant weight to quantize")
    out = Path(out) if out else model_path.with_name(model_path.stem + ".int8.onnx")
    paths = list_images(calib_dir)
    if len(paths) < calib_size:
        log.warning("calibration: asked for %d images, %s holds %d; calibrating on %d", calib_size, calib_dir,
                    len(paths), len(paths))
    calib_paths, held_paths = split_for_calibration(paths, min(calib_size, len(paths)))
    calib, calib_paths = load_images(calib_paths, pre)
    excluded = default_exclusions(model, targets)
    for pattern in exclude:
        excluded |= {t.node for t in targets if fnmatch.fnmatch(t.node, pattern)}
    # Statistics only where Q/DQ goes: excluded products never come back (the --max-drop
    # fallback only excludes more), and a hybrid's float backbone maps are most of the bytes.
    chosen = [t for t in targets if t.node not in excluded]
    tensors = list(dict.fromkeys(t.activation for t in chosen))
    model_sha = "+".join(sha256_file(model_path.with_name(f)) for f in onnx_io.files_of(model_path))  # with its weights
    key = _calib_key(model_sha, [sha256_file(p) for p in calib_paths], method, pre, tensors + sorted(excluded),
                     [smooth, overflow_fix])
    keep_original = report or max_drop is not None  # the per-layer report and the fallback compare with it
    norms = set(_layernorm_outputs(model))
    # "auto" also builds the plain recipe and keeps the one that answers more like FP32; it
    # needs `model` intact, and is skipped where that would cost what a big model cannot
    # spare (external weights: vit-h14) or where --report / --max-drop work on the first.
    given = scheme != "symmetric" or method != "mse" or smooth != "auto" or not attention  # options asked for
    choose = recipe == "auto" and not given and not keep_original and not onnx_io.has_external(model)
    if recipe == "auto" and not choose:
        log.info("recipe: smoothquant (auto weighs the plain recipe only with the default options, without "
                 "--report/--max-drop, for models under 2 GB)")
    if recipe == "plain" and keep_original:
        raise UserError("--report and --max-drop work with the smoothquant recipe, not with --recipe plain")
    keep_original = keep_original or choose or recipe == "plain"
    smoothed, stats, thresholds, factors, hit, stats0 = calibrate(
        model, chosen, excluded, calib, method, smooth, key, recalibrate, in_place=not keep_original,
        weight_top=PAIR_SAFE if overflow_fix == "all" else 127)
    ranges = {t: [thresholds[t], float(stats[t].lo.min()), float(stats[t].hi.max())] for t in thresholds}
    s_targets = find_targets(smoothed, attention)  # smoothing gave the rescaled weights new names
    levels = weight_levels(smoothed, s_targets, overflow_fix)
    # GPTQ needs one more pass over the images and each weight in float64 beside its Gram
    # matrix; a model with external weights (vit-h14, whose memory line is 3x its weights)
    # keeps nearest rounding.
    gptq = weight_rounding == "gptq" and not onnx_io.has_external(model)
    if weight_rounding == "gptq" and not gptq:
        log.info("weight rounding: nearest (GPTQ is for models under 2 GB)")
    # "auto" chooses between recipes rounded to nearest, then rounds the chosen one by GPTQ:
    # GPTQ fits the calibration images, and where no held-out image is left the choice is
    # made on them (the real DINOv2: smoothquant + GPTQ scored >= 0.997 there and 0.9386 on
    # the 38 other photos).
    def smoothquant_by_gptq() -> dict:
        return gptq_weights(smoothed, [t for t in s_targets if t.node not in excluded], levels, calib)

    rounded = smoothquant_by_gptq() if gptq and not choose and recipe != "plain" else {}
    corrected = [0]

    def build(excl: set[str]) -> onnx.ModelProto:
        # In place when built once; the report and the --max-drop fallback need `model`
        # (which `smoothed` may be) intact, and the fallback builds again.
        base = _copy(smoothed) if keep_original else smoothed
        if bias_correction:
            corrected[0] = correct_biases(base, [t for t in s_targets if t.node not in excl], stats, levels, rounded)
        # bias correction renames the biases it changes, not the weights: targets still hold
        return insert_qdq(base, [t for t in s_targets if t.node not in excl], ranges, scheme, levels, in_place=True,
                          operand_levels=63 if overflow_fix == "all" else 127, rounded=rounded)

    qmodel = build(excluded) if recipe != "plain" else None
    chosen_recipe, scores = "smoothquant", {}
    if choose:
        images = load_images((held_paths or calib_paths)[:SELECT_IMAGES], pre)[0]
        ref = _run(model, images)
        scores["smoothquant"] = output_correlation(ref, _run(qmodel, images))
    if recipe == "plain" or (choose and scores["smoothquant"]["worst"] < GOOD_ENOUGH):
        plain_args = (model, targets, excluded, stats0, overflow_fix, bias_correction)
        plain, plain_excluded, plain_corrected, plain_rounded = build_plain(
            *plain_args, calib if gptq and not choose else None)
        if choose:
            scores["plain"] = output_correlation(ref, _run(plain, images))
        if recipe == "plain" or scores["plain"]["worst"] > scores["smoothquant"]["worst"]:
            if gptq and choose:
                plain, plain_excluded, plain_corrected, plain_rounded = build_plain(*plain_args, calib)
            chosen_recipe, qmodel, excluded, corrected[0] = "plain", plain, plain_excluded, plain_corrected
            rounded = plain_rounded
            s_targets, levels, factors = find_targets(model, False), weight_levels(model, targets, overflow_fix), {}
    if gptq and choose and chosen_recipe == "smoothquant":
        rounded = smoothquant_by_gptq()
        qmodel = build(excluded)
    if choose:
        log.info("recipe: %s (output correlation worst/mean on %d images: %s)", chosen_recipe,
                 min(SELECT_IMAGES, len(held_paths or calib_paths)),
                 ", ".join(f"{k} {v['worst']:.5f}/{v['mean']:.5f}" for k, v in scores.items()))
    fidelity, guarded = {}, []
    # The guard: only where the chosen recipe (rounded to nearest) scored below GOOD_ENOUGH is
    # the written model measured, and only below min_correlation does it act.
    if choose and min_correlation and scores[chosen_recipe]["worst"] < GOOD_ENOUGH:
        # more images than the choice's: the worst of few images flatters the tail
        images = load_images((held_paths or calib_paths)[:GUARD_IMAGES], pre)[0]
        ref = _run(model, images)
        fidelity = output_correlation(ref, _run(qmodel, images))
        if fidelity["worst"] < min_correlation:
            if chosen_recipe == "plain":
                def variant(extra: set[str]):
                    m, excl, n, _ = build_plain(*plain_args[:2], plain_args[2] | extra, *plain_args[3:],
                                                rounded=rounded)
                    return m, excl, n
            else:
                def variant(extra: set[str]):
                    m = build(excluded | extra)
                    return m, excluded | extra, corrected[0]
            inits = _initializers(model)
            sizes = {t.node: int(np.prod(inits[t.weight].dims)) if t.weight in inits else 0 for t in targets}
            kept = guard_fidelity(variant, product_groups(model, targets, excluded), ref, images, fidelity,
                                  min_correlation, sizes)
            if kept:
                qmodel, excluded, corrected[0], fidelity, guarded = kept
    result = QuantResult(out, [], sorted(excluded), method, [p.name for p in calib_paths], [p.name for p in held_paths],
                         cache_hit=hit, preprocessing=pre.to_dict(), preprocessing_source=pre_source,
                         smoothed_layernorms=len(set(factors) & norms), smoothed_products=len(set(factors) - norms),
                         recipe=chosen_recipe, recipe_scores=scores, fidelity=fidelity, guarded=guarded)
    if report or max_drop is not None:
        result.report = layer_report(model, qmodel, targets, excluded, calib)
    if max_drop is not None:
        qmodel, excluded = _fallback(model, qmodel, build, excluded, result.report, held_paths or calib_paths,
                                     pre, max_drop, result)
    result.bias_corrected = corrected[0]
    result.gptq_weights = len({t.weight for t in s_targets if t.weight in rounded and t.node not in excluded})
    result.quantized = sorted({t.node for t in targets} - excluded)
    result.attention_products = len({t.node for t in targets if t.weight is None} - excluded)  # plain: 0
    result.excluded = sorted(excluded)
    meta = onnx_io.get_metadata(qmodel)
    result.seven_bit_weights = sorted({t.weight for t in s_targets if levels.get(t.weight) == 63
                                       and t.node in result.quantized})
    plain = chosen_recipe == "plain"
    meta.update({"quantization": {"recipe": chosen_recipe, "recipe_scores": scores,
                                  "method": "minmax" if plain else method,
                                  "scheme": f"activations {'centred' if plain else scheme}, weights int8 symmetric "
                                            "per channel",
                                  "overflow_fix": overflow_fix, "seven_bit_weights": result.seven_bit_weights,
                                  "smoothquant": str(smooth), "smoothed_layernorms": result.smoothed_layernorms,
                                  "smoothed_products": result.smoothed_products,
                                  "bias_corrected": result.bias_corrected,
                                  "gptq_weights": result.gptq_weights,
                                  "attention_products": result.attention_products,
                                  "quantized": len(result.quantized), "excluded": result.excluded,
                                  "selection_correlation": fidelity, "fidelity_guard": {
                                      "min_correlation": min_correlation, "returned_to_float": guarded},
                                  "size_folded": folded},
                 "preprocessing": pre.to_dict(), "preprocessing_source": pre_source})
    onnx_io.set_metadata(qmodel, meta)
    onnx_io.save_atomic(qmodel, out)
    if result.agreement is not None and result.agreement < 1 - max_drop:
        raise CheckFailed(f"top-1 agreement {result.agreement:.4f} misses 1 - max_drop even with every "
                          f"layer in float; wrote {out} anyway")
    return result


def build_plain(model: onnx.ModelProto, targets: list[QTarget], excluded: set[str], stats0: dict, overflow_fix: str,
                bias_correction: bool, gptq_images: np.ndarray | None = None, rounded: dict | None = None
                ) -> tuple[onnx.ModelProto, set[str], int, dict]:
    """The plain recipe, for trained ViTs whose rare large activations carry meaning: the
    full calibration range (no clipping: the massive activations of a DINOv2's class token
    are 10 elements among millions, and clipping them moved every output), no migration,
    activations centred (see _centres), the Linears only (softmax x V in 8 bits lost most
    of a diffuse attention row), the layer that reads the image in float (its 7-bit
    weights alone cost a trained DINOv2 ViT-S/14 a worst-image correlation of 0.9934 -> 0.9852),
    and the first transformer block in float too: a trained ViT's massive activations form
    there (that DINOv2's block-0 fc1 reads LayerNorm outputs up to 123 where most are within
    +-3), its errors travel through every later block, and in float it raised the worst
    held-out image on both runtimes with 10 and with 32 calibration images (ORT 0.99499 ->
    0.99531 and 0.99654 -> 0.99728, OpenVINO 0.99398 -> 0.99520 and 0.99347 -> 0.99731) for
    1/12 of the Linears' INT8 gain.
    `gptq_images`: round the weights by GPTQ on these calibration images (else nearest);
    `rounded`: GPTQ's roundings already made (each Linear's is its own: a subset stays valid).
    Returns (model, products in float, biases corrected, {weight: GPTQ's int8 and scale})."""
    skip = excluded | {t.node for t in first_layer(model, targets) + first_block(model, targets)} | \
        {t.node for t in targets if t.weight is None}
    chosen = [t for t in targets if t.node not in skip and t.activation in stats0]
    ranges = {}
    for t in chosen:
        lo, hi = float(stats0[t.activation].lo.min()), float(stats0[t.activation].hi.max())
        ranges[t.activation] = [max(abs(lo), abs(hi)), lo, hi]
    out = _copy(model)
    levels = weight_levels(model, chosen, overflow_fix)
    if rounded is None:
        rounded = gptq_weights(model, chosen, levels, gptq_images) if gptq_images is not None else {}
    corrected = correct_biases(out, chosen, stats0, levels, rounded) if bias_correction else 0
    out = insert_qdq(out, chosen, ranges, "centred", levels, in_place=True, rounded=rounded)
    return out, {t.node for t in targets} - {t.node for t in chosen}, corrected, rounded


def product_groups(model: onnx.ModelProto, targets: list[QTarget], excluded: set[str]) -> list[list[str]]:
    """The quantized products in graph order, cut at each Softmax: about one transformer
    block each (a block's query/key/value Linears come before its Softmax, the rest after),
    the image-reading Conv alone. A graph with fewer than 4 such groups is cut into up to 8
    equal runs instead. The unit that guard_fidelity returns to float."""
    quantized = {t.node for t in targets} - excluded
    groups, current = [], []
    for n in model.graph.node:
        if n.op_type == "Softmax" and current:
            groups.append(current)
            current = []
        if n.name in quantized:
            if n.op_type == "Conv":
                groups.append([n.name])
            else:
                current.append(n.name)
    if current:
        groups.append(current)
    if len(groups) < 4:
        flat = [name for g in groups for name in g]
        groups = [list(g) for g in np.array_split(np.array(flat, dtype=object), min(8, len(flat))) if len(g)]
    return groups


def guard_fidelity(variant, groups: list[list[str]], ref: list[np.ndarray], images: np.ndarray, fidelity: dict,
                   target: float, sizes: dict[str, int] | None = None):
    """Return groups of products to float until the worst image's output correlation with
    FP32 reaches `target`: first each group alone, to rank them by what float gains, then
    the best ones together, one at a time, at most GUARD_SHARE of the groups (a file mostly
    in float would not be the INT8 model asked for: then the best reached is kept, with a
    warning). Then, where one product of the last group added may be enough, each alone,
    smallest weight first (`sizes`: weight elements per product; each product in float
    costs its share of the INT8 speed-up). What NNCF's accuracy control does by layer,
    here by block and then by product, and on output correlation rather than a metric: a
    ViT backbone has no labels.
    `variant(extra)` builds (model, excluded, biases corrected) with the products in `extra`
    in float too. Returns (model, excluded, biases corrected, its correlation, the products
    returned to float), or None where no group gained anything."""
    before = fidelity["worst"]
    log.info("fidelity guard: worst output correlation %.5f < %.4f on %d images; ranking %d groups of products",
             before, target, len(images), len(groups))
    def measure(m) -> dict:
        return output_correlation(ref, _run(m, images))

    alone, first = [], None  # first: the best group's build and score, which is also step 1 below
    for g in groups:
        built = variant(set(g))
        score = measure(built[0])
        alone.append(score["worst"])
        if first is None or score["worst"] > first[1]["worst"]:
            first = (built, score)
        del built
    order = sorted(range(len(groups)), key=lambda i: -alone[i])[:max(1, int(len(groups) * GUARD_SHARE))]
    best, extra, stalled, used = None, set(), 0, 0
    sizes = sizes or {}
    for step, i in enumerate(order, 1):
        extra |= set(groups[i])
        if step == 1:
            (m, excl, corrected), score = first
            first = None
        else:
            m, excl, corrected = variant(extra)
            score = measure(m)
        log.info("fidelity guard: %d product(s) in float, worst %.5f", len(extra), score["worst"])
        if best is None or score["worst"] > best[3]["worst"]:
            best, stalled, used = (m, excl, corrected, score, sorted(extra)), 0, step
        else:
            stalled += 1
        if score["worst"] >= target or stalled == 2:  # reached, or two more groups in float gained nothing
            break
    if best[3]["worst"] >= target and len(groups[order[used - 1]]) > 1:
        # the last group's products one at a time, smallest weight first: one may be enough
        before_last = set(best[4]) - set(groups[order[used - 1]])
        for node in sorted(groups[order[used - 1]], key=lambda n: sizes.get(n, 0)):
            m, excl, corrected = variant(before_last | {node})
            score = measure(m)
            if score["worst"] >= target:
                log.info("fidelity guard: %d product(s) in float are enough, worst %.5f", len(before_last) + 1,
                         score["worst"])
                best = (m, excl, corrected, score, sorted(before_last | {node}))
                break
    if best[3]["worst"] < target:
        log.warning("fidelity guard: with %d of %d groups of products in float the worst output correlation is "
                    "%.5f, below %.4f; kept that file (see --report, --exclude)", used, len(groups),
                    best[3]["worst"], target)
    if best[3]["worst"] <= before:  # nothing gained: the file as it was
        return None
    return best


def output_correlation(ref: list[np.ndarray], out: list[np.ndarray]) -> dict:
    """{"worst", "mean"} of the per-image correlation of the model's outputs with FP32's:
    the worst of every output and image, the mean of each output's mean (a model with a
    second output, such as masks beside class scores, is judged on both)."""
    rs = []
    for a, b in zip(ref, out):
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        varies = a.std(1) > 0  # a row constant in FP32 (a one-number output) has no correlation
        if varies.any():
            rs.append(correlation(a[varies], b[varies]))
    if not rs:  # nothing varies: how close the numbers are
        rs = [cosine(ref[0], out[0])]
    return {"worst": round(float(min(r.min() for r in rs)), 6), "mean": round(float(np.mean([r.mean() for r in rs])), 6)}


def _fallback(model, qmodel, build, excluded, report, eval_paths, pre, max_drop, result):
    """Return layers to float, worst first, until top-1 agreement >= 1 - max_drop."""
    images, _ = load_images(eval_paths, pre)
    ref = _run(model, images)[0]
    order = [r["node"] for r in sorted(report, key=lambda r: -r["rel_error"]) if r["quantized"]]
    agreement = top1_agreement(ref, _run(qmodel, images)[0])
    step = max(1, len(order) // 16)
    while agreement < 1 - max_drop and order:
        excluded = excluded | set(order[:step])
        order = order[step:]
        qmodel = build(excluded)
        agreement = top1_agreement(ref, _run(qmodel, images)[0])
        log.info("max-drop: %d layer(s) back in float, top-1 agreement %.4f", len(excluded), agreement)
    result.agreement = agreement
    return qmodel, excluded


def stage_quantize(tx, calib_dir, calib_size: int, method: str, force: bool, stages, exclude=(), max_drop=None,
                   overflow_fix: str = "auto", runtimes=()):
    """Pipeline stage: model.onnx -> model.int8.onnx in the bundle."""
    from .images import default_calibration_dir
    from .versions import cache_key, tool_versions

    bundle = tx.bundle
    overflow_fix = resolve_overflow_fix(overflow_fix, runtimes)
    src = bundle.find("onnx", "fp32")
    src_path = bundle.verify(src)
    calib_dir = Path(calib_dir) if calib_dir else default_calibration_dir()
    images = list_images(calib_dir)
    key = cache_key(src=src["sha256"], images=[(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in images],
                    calib_size=calib_size, method=method, exclude=list(exclude), max_drop=max_drop,
                    overflow_fix=overflow_fix, recipe=RECIPE,
                    versions=tool_versions("onnx", "onnxruntime"))
    old = bundle.reusable("onnx", "int8", key, force)
    if old:
        return old
    out = tx.stage("model.int8.onnx")
    result = stages.run("quantize", quantize, src_path, calib_dir, out, method=method, exclude=exclude,
                        calib_size=calib_size, max_drop=max_drop, recalibrate=force, overflow_fix=overflow_fix)
    from . import onnx_io
    plain = result.recipe == "plain"
    entry = {"backend": "onnx", "precision": "int8", "source": src["path"], "cache_key": key,
             "quantization": {"recipe": result.recipe, "recipe_scores": result.recipe_scores,
                              "method": "minmax" if plain else method,
                              "scheme": "int8 symmetric (zero point 0)" + (", activations centred" if plain else "")
                                        + ", weights per channel",
                              "calibration_dir": str(calib_dir.resolve()),
                              "calibration_images": result.calibration_images,
                              "held_out_images": result.held_out_images,
                              "quantized_nodes": len(result.quantized), "excluded_nodes": result.excluded,
                              "agreement": result.agreement, "overflow_fix": overflow_fix,
                              "seven_bit_weights": result.seven_bit_weights,
                              "smoothquant": "none" if plain else "auto",
                              "smoothed_layernorms": result.smoothed_layernorms,
                              "smoothed_products": result.smoothed_products,
                              "bias_corrected": result.bias_corrected,
                              "gptq_weights": result.gptq_weights,
                              "attention_products": result.attention_products,
                              "selection_correlation": result.fidelity, "returned_to_float": result.guarded}}
    return tx.add_artifact(entry, onnx_io.files_of(out))
