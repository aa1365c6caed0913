"""Stage: FP32 ONNX -> INT8 Q/DQ ONNX from calibration images.

The recipe (FQ-ViT, TinyNeuralNetwork and ModelOpt all point the same way):
explicit QuantizeLinear/DequantizeLinear on the inputs and weights of the
matrix products that have a weight (Gemm, MatMul with a constant, the patch
Conv); weights per output channel; everything symmetric with zero point 0,
which TensorRT requires. LayerNorm, Softmax, GELU, the residual Adds and the
classification head stay in floating point. One file serves ONNX Runtime,
OpenVINO and TensorRT.

The overflow fix: x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake)
multiply uint8 by int8 with VPMADDUBSW, which adds each pair of products into a
saturating int16; both CPU runtimes shift int8 activations to uint8 first. With
full-range weights the pairs overflow. Measured on an AVX2-only CPU (logit
cosine to FP32): OpenVINO INT8 vit-b16 0.924; vit-ti16 at 64 px 0.984 on ONNX
Runtime where the same Q/DQ arithmetic done exactly gives 0.995. Weights in
[-63, 63] (7 bits) cannot overflow, and then the INT8 kernels match the exact
arithmetic on any CPU, for ~0.001 of cosine on CPUs that have VNNI. So `auto`
uses 7-bit weights whenever a CPU runtime may run the model and full 8-bit
weights for TensorRT alone (GPUs do not saturate); `first-layer` is NNCF's
default (the layer that reads the image only).
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
from onnx import TensorProto, helper, numpy_helper

from . import onnx_io
from .errors import CheckFailed, UserError
from .images import list_images, load_images, split_for_calibration
from .parity import cosine  # noqa: F401  (one definition, shared with the parity check)
from .progress import progress
from .zoo import Preprocessing

log = logging.getLogger("vit_deploy")
METHODS = ("minmax", "entropy", "percentile")
SCHEMES = ("symmetric", "asymmetric")
OVERFLOW_FIXES = ("auto", "all", "first-layer", "off")
PERCENTILE = 99.99
BINS = 4096


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
            out.append(QTarget(n.name + "#B", "MatMul", n.input[1], None, 0))
    return out


def default_exclusions(model, targets: list[QTarget]) -> set[str]:
    """The classification head: the matrix product whose output reaches the logits."""
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
        if n.op_type in ("Add", "Reshape", "Flatten", "Squeeze", "Gather", "Identity", "Cast"):
            frontier.extend(i for i in n.input)
    names = {t.node for t in targets}
    return excluded & names


# ------------------------------------------------------------- calibration

def _add_outputs(m: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """Expose intermediate tensors as graph outputs (in place); returns `m`."""
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors if t not in have)
    return m


def _session(model: onnx.ModelProto, threads: int | None = None):
    """An ONNX Runtime session on an in-memory model; one over protobuf's 2 GB
    limit (vit-h14) goes through a temporary file with its weights beside it."""
    import tempfile

    import onnxruntime as ort

    from .backends.onnxruntime_backend import session_options
    so = session_options(threads)
    if onnx_io.initializer_bytes(model) < onnx_io.EXTERNAL_THRESHOLD:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="vit-deploy-") as tmp:
        path = Path(tmp) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # saving with external data empties the tensors it writes out
        onnx_io.save(copy, path, external=True)
        del copy
        # The session holds its own copy of the weights once built, so the files can go.
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _batches(x: np.ndarray, size: int = 8):
    for i in range(0, len(x), size):
        yield x[i:i + size]


def entropy_threshold(hist: np.ndarray, upper_edges: np.ndarray, levels: int = 128) -> float:
    """TensorRT-style KL-divergence calibration on a histogram of |x|: the clipping
    threshold whose 128-level quantization loses the least information."""
    hist = hist.astype(np.float64)
    n = len(hist)
    nonzero = (hist > 0).astype(np.float64)
    best, best_i = np.inf, n
    for i in range(levels, n + 1, max(1, n // 256)):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()  # the clipped tail lands in the last bin
        bounds = np.linspace(0, i, levels + 1).astype(int)
        sums = np.add.reduceat(hist[:i], bounds[:-1])
        counts = np.add.reduceat(nonzero[:i], bounds[:-1])
        chunk = np.repeat(np.arange(levels), np.diff(bounds))
        q = np.where(nonzero[:i] > 0, (sums / np.maximum(counts, 1))[chunk], 0.0)
        if q.sum() == 0 or p.sum() == 0:
            continue
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        if (q[mask] == 0).any():
            continue  # infinite divergence
        kl = float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if kl < best:
            best, best_i = kl, i
    return float(upper_edges[best_i - 1])


def collect_ranges(model_path: Path, tensors: list[str], images: np.ndarray, method: str) -> dict[str, list[float]]:
    """Per tensor over the calibration images: [clipping threshold of |x|, min, max]."""
    sess = _session(_add_outputs(onnx_io.load(model_path), tensors))
    names = [o.name for o in sess.get_outputs()]
    want = [names.index(t) for t in tensors]
    inp = sess.get_inputs()[0].name
    amax = {t: 0.0 for t in tensors}
    lo, hi = {t: 0.0 for t in tensors}, {t: 0.0 for t in tensors}
    hists = {t: np.zeros(BINS, np.int64) for t in tensors}
    passes = 1 if method == "minmax" else 2
    n_batches = (len(images) + 7) // 8
    for p in range(passes):
        for batch in progress(_batches(images), n_batches, f"calibrating ({method}, pass {p + 1}/{passes})"):
            outs = sess.run(None, {inp: batch})
            for t, j in zip(tensors, want):
                a = np.abs(outs[j])
                if p == 0:
                    amax[t] = max(amax[t], float(a.max()))
                    lo[t], hi[t] = min(lo[t], float(outs[j].min())), max(hi[t], float(outs[j].max()))
                else:  # bincount on bin indices: ~10x faster than np.histogram
                    idx = (a.ravel() * (BINS / (amax[t] or 1.0))).astype(np.int32)
                    np.minimum(idx, BINS - 1, out=idx)
                    hists[t] += np.bincount(idx, minlength=BINS)
    out = dict(amax)
    for t in tensors if method != "minmax" else ():
        edges = np.linspace(0.0, amax[t] or 1.0, BINS + 1)
        if method == "percentile":
            cdf = np.cumsum(hists[t]) / max(1, hists[t].sum())
            out[t] = float(edges[min(BINS, int(np.searchsorted(cdf, PERCENTILE / 100.0)) + 1)])
        else:
            out[t] = entropy_threshold(hists[t], edges[1:])
        out[t] = out[t] or amax[t] or 1.0
    return {t: [out[t] or 1.0, lo[t], hi[t]] for t in tensors}


def _cache_dir() -> Path:
    base = os.environ.get("VIT_DEPLOY_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                              os.path.expanduser("~/.cache"), "vit-deploy")
    return Path(base) / "calibration"


def _calib_key(model_sha: str, image_shas: list[str], method: str, pre: Preprocessing, tensors: list[str]) -> str:
    blob = json.dumps(["ranges-v2", model_sha, image_shas, method, pre.to_dict(), tensors, PERCENTILE, BINS])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


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


def activation_qparams(clip: float, lo: float, hi: float, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of one activation tensor.

    symmetric: int8, zero point 0, range [-clip, clip] (what TensorRT requires).
    asymmetric: uint8 over [max(min, -clip), min(max, clip)], so a one-sided
    tensor (GELU's output) gets all 256 levels; CPU runtimes only."""
    if scheme == "symmetric":
        return np.array(max(clip, 1e-8) / 127.0, np.float32), np.array(0, np.int8)
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
        ok = tensor in inputs if n is None else (n.op_type not in products and
                                                 any(fed_by_input_only(i) for i in n.input if i))
        cache[tensor] = ok
        return ok
    return [t for t in targets if t.weight is not None and fed_by_input_only(t.activation)]


def weight_levels(model: onnx.ModelProto, targets: list[QTarget], overflow_fix: str) -> dict[str, int]:
    """Largest int8 weight magnitude per weight tensor: 63 where the (resolved) overflow fix
    applies; tensors not listed keep 127."""
    fixed = first_layer(model, targets) if overflow_fix == "first-layer" else targets if overflow_fix == "all" else []
    return {t.weight: 63 for t in fixed if t.weight is not None}


def insert_qdq(model: onnx.ModelProto, targets: list[QTarget], ranges: dict[str, list[float]],
               scheme: str = "symmetric", levels: dict[str, int] | None = None) -> onnx.ModelProto:
    """Q/DQ on each target's activation (per tensor) and weight (per channel, int8, symmetric;
    `levels` caps some weights at +-63, see the overflow fix above)."""
    inits = _initializers(model)
    new_nodes, new_inits = [], []
    act_dq: dict[str, str] = {}
    weight_dq: dict[str, str] = {}
    rewire: dict[tuple[str, int], str] = {}
    for t in targets:
        node_name = t.node.split("#")[0]
        if t.activation not in act_dq:
            scale, zp = activation_qparams(*ranges[t.activation], scheme)
            act_dq[t.activation] = _qdq_pair(new_nodes, new_inits, t.activation, scale, None, _safe(t.activation), zp)
        idx = 1 if t.node.endswith("#B") else 0
        rewire[(node_name, idx)] = act_dq[t.activation]
        if t.weight is not None:
            if t.weight not in weight_dq:
                w = numpy_helper.to_array(inits[t.weight]).astype(np.float32)
                red = tuple(i for i in range(w.ndim) if i != t.axis)
                top = (levels or {}).get(t.weight, 127)
                scale = np.maximum(np.abs(w).max(axis=red), 1e-12) / top
                shape = [1] * w.ndim
                shape[t.axis] = -1
                q = np.clip(np.round(w / scale.reshape(shape)), -top, top).astype(np.int8)
                tag = _safe(t.weight)
                qname, s_name, z_name = f"{tag}_int8", f"{tag}_scale", f"{tag}_zero_point"
                new_inits += [numpy_helper.from_array(q, qname),
                              numpy_helper.from_array(scale.astype(np.float32), s_name),
                              numpy_helper.from_array(np.zeros(scale.shape, np.int8), z_name)]
                dq = f"{tag}_dequantized"
                new_nodes.append(helper.make_node("DequantizeLinear", [qname, s_name, z_name], [dq],
                                                  name=f"{tag}_DequantizeLinear", axis=t.axis))
                weight_dq[t.weight] = dq
            rewire[(node_name, 1)] = weight_dq[t.weight]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for n in g.node:
        for i in range(len(n.input)):
            if (n.name, i) in rewire:
                n.input[i] = rewire[(n.name, i)]
    # Q/DQ nodes must precede their consumers: put them first (their inputs are
    # graph inputs, initializers or produced earlier), then topologically sort.
    nodes = _toposort(list(g.node) + new_nodes, {i.name for i in g.input} | {t.name for t in g.initializer} |
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


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in name).strip("_") or "t"


def _toposort(nodes, available: set[str]):
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


# ------------------------------------------------------------- evaluation

def _run(model: onnx.ModelProto, images: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    m = model
    if outputs:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        _add_outputs(m, outputs)
    sess = _session(m)
    inp = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]
    collected = [[] for _ in names]
    for batch in _batches(images):
        for j, o in enumerate(sess.run(None, {inp: batch})):
            collected[j].append(o)
    return [np.concatenate(c) for c in collected]


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())




def layer_report(fp32: onnx.ModelProto, int8: onnx.ModelProto, targets: list[QTarget], excluded: set[str],
                 images: np.ndarray) -> list[dict]:
    """Each matrix product: quantized or not, and its output error against FP32."""
    nodes = {n.name: n for n in fp32.graph.node}
    outs = list(dict.fromkeys(nodes[t.node.split("#")[0]].output[0] for t in targets))
    ref = dict(zip([o.name for o in fp32.graph.output] + outs, _run(fp32, images, outs)))
    got = dict(zip([o.name for o in int8.graph.output] + outs, _run(int8, images, outs)))
    rows = []
    for t in dict((t.node.split("#")[0], t) for t in targets).values():
        name = t.node.split("#")[0]
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

def preprocessing_of(model: onnx.ModelProto, img_size=None, mean=None, std=None) -> Preprocessing:
    """From vit-deploy's metadata when present, else from the options (for foreign ONNX files)."""
    meta = onnx_io.get_metadata(model).get("preprocessing")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or dims[1].dim_value not in (0, 3):
        raise UserError(f"the model's input is not a 4-D image tensor [batch, 3, H, W] "
                        f"(got {len(dims)} dimensions)")
    if meta and img_size is None and mean is None and std is None:
        return Preprocessing.from_dict(meta)
    size = img_size or dims[2].dim_value
    if not size:
        raise UserError("the model's input has no fixed image size: pass --img-size")
    return Preprocessing(img_size=int(size), crop_pct=0.9 if meta is None else meta["crop_pct"],
                         mean=tuple(mean or (meta or {}).get("mean") or (0.5, 0.5, 0.5)),
                         std=tuple(std or (meta or {}).get("std") or (0.5, 0.5, 0.5)))


def quantize(model_path, calib_dir, out=None, method: str = "percentile", exclude=(), calib_size: int = 32,
             max_drop: float | None = None, img_size=None, mean=None, std=None, attention: bool = False,
             report: bool = False, recalibrate: bool = False, scheme: str = "symmetric",
             overflow_fix: str = "auto") -> QuantResult:
    """Quantize an FP32 ViT ONNX model to a Q/DQ INT8 model (see the module docstring)."""
    from .weights import sha256_file

    model_path = Path(model_path)
    if not model_path.is_file():
        raise UserError(f"model not found: {model_path}")
    if scheme not in SCHEMES:
        raise UserError(f"unknown scheme '{scheme}': choose from {', '.join(SCHEMES)}")
    if method not in METHODS:
        raise UserError(f"unknown calibration method '{method}': choose from {', '.join(METHODS)}")
    if calib_size < 1:
        raise UserError(f"--calib-size must be at least 1, got {calib_size}")
    overflow_fix = resolve_overflow_fix(overflow_fix)  # the manifest records what was done, never "auto"
    try:
        model = onnx_io.load(model_path)
    except Exception as e:
        raise UserError(f"{model_path}: not a readable ONNX model ({type(e).__name__})") from None
    pre = preprocessing_of(model, img_size, mean, std)
    out = Path(out) if out else model_path.with_name(model_path.stem + ".int8.onnx")
    paths = list_images(calib_dir)
    calib_paths, held_paths = split_for_calibration(paths, min(calib_size, len(paths)))
    calib, calib_paths = load_images(calib_paths, pre)
    targets = find_targets(model, attention)
    if not targets:
        raise UserError(f"{model_path.name}: no matrix product with a constant weight to quantize")
    excluded = default_exclusions(model, targets)
    for pattern in exclude:
        excluded |= {t.node.split("#")[0] for t in targets if fnmatch.fnmatch(t.node.split("#")[0], pattern)}
    levels = weight_levels(model, targets, overflow_fix)
    tensors = list(dict.fromkeys(t.activation for t in targets))
    model_sha = "+".join(sha256_file(model_path.with_name(f)) for f in onnx_io.files_of(model_path))  # with its weights
    key = _calib_key(model_sha, [sha256_file(p) for p in calib_paths], method, pre, tensors)
    cache = _cache_dir() / f"{key}.json"
    hit = cache.is_file() and not recalibrate
    if hit:
        ranges = json.loads(cache.read_text())
        log.info("calibration: reusing cached ranges (%s)", cache.name)
    else:
        ranges = collect_ranges(model_path, tensors, calib, method)
        from .atomic import write_json
        write_json(cache, ranges)

    def build(excl: set[str]) -> onnx.ModelProto:
        return insert_qdq(model, [t for t in targets if t.node.split("#")[0] not in excl], ranges, scheme, levels)

    qmodel = build(excluded)
    result = QuantResult(out, [], sorted(excluded), method, [p.name for p in calib_paths], [p.name for p in held_paths],
                         cache_hit=hit)
    if report or max_drop is not None:
        result.report = layer_report(model, qmodel, targets, excluded, calib)
    if max_drop is not None:
        qmodel, excluded = _fallback(model, qmodel, build, excluded, result.report, held_paths or calib_paths,
                                     pre, max_drop, result)
    result.quantized = sorted({t.node.split("#")[0] for t in targets} - excluded)
    result.excluded = sorted(excluded)
    meta = onnx_io.get_metadata(qmodel)
    result.seven_bit_weights = sorted({t.weight for t in targets if t.weight in levels
                                       and t.node.split("#")[0] in result.quantized})
    meta.update({"quantization": {"method": method, "scheme": f"activations {scheme}, weights int8 symmetric per channel",
                                  "overflow_fix": overflow_fix, "seven_bit_weights": result.seven_bit_weights,
                                  "quantized": len(result.quantized), "excluded": result.excluded},
                 "preprocessing": pre.to_dict()})
    onnx_io.set_metadata(qmodel, meta)
    onnx_io.save_atomic(qmodel, out)
    if result.agreement is not None and result.agreement < 1 - max_drop:
        raise CheckFailed(f"top-1 agreement {result.agreement:.4f} misses 1 - max_drop even with every "
                          f"layer in float; wrote {out} anyway")
    return result


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
                    overflow_fix=overflow_fix,
                    versions=tool_versions("onnx", "onnxruntime"))
    old = bundle.reusable("onnx", "int8", key, force)
    if old:
        return old
    out = tx.stage("model.int8.onnx")
    result = stages.run("quantize", quantize, src_path, calib_dir, out, method=method, exclude=exclude,
                        calib_size=calib_size, max_drop=max_drop, recalibrate=force, overflow_fix=overflow_fix)
    from . import onnx_io
    entry = {"backend": "onnx", "precision": "int8", "source": src["path"], "cache_key": key,
             "quantization": {"method": method, "scheme": "int8 symmetric (zero point 0), weights per channel",
                              "calibration_dir": str(calib_dir.resolve()),
                              "calibration_images": result.calibration_images,
                              "held_out_images": result.held_out_images,
                              "quantized_nodes": len(result.quantized), "excluded_nodes": result.excluded,
                              "agreement": result.agreement, "overflow_fix": overflow_fix,
                              "seven_bit_weights": result.seven_bit_weights}}
    return tx.add_artifact(entry, onnx_io.files_of(out))
