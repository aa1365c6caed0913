"""Statistics of the float model's activations over the calibration images, and the
clipping threshold each quantized tensor gets from them.

Two passes over the images: per-channel statistics first (|x| max, min, max, mean:
what outlier migration, bias correction and the histogram range need), then a
histogram of |x| per tensor for the threshold. Channels are what the reading product
sums over: axis 1 of a Conv's input ([N, C, H, W]), the last axis of a Linear's, whatever
its rank (tokens [B, T, C]; the channels-last maps [B, H, W, C] of timm's Swin).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from . import onnx_io
from .errors import UserError
from .progress import progress_bar

METHODS = ("mse", "minmax", "entropy", "percentile")
PERCENTILE = 99.99
BINS = 4096
LEVELS = 127  # symmetric int8: the threshold maps to 127


@dataclass
class ChannelStats:
    """One tensor over the calibration images, per channel."""
    amax: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    mean: np.ndarray

    def divided(self, s: np.ndarray) -> "ChannelStats":
        """The statistics of x / s (s > 0 per channel): exact, no new pass needed."""
        return ChannelStats(self.amax / s, self.lo / s, self.hi / s, self.mean / s)

    def to_json(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("amax", "lo", "hi", "mean")}

    @classmethod
    def from_json(cls, d: dict) -> "ChannelStats":
        return cls(*(np.asarray(d[k], np.float64) for k in ("amax", "lo", "hi", "mean")))


def add_outputs(m: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """Expose intermediate tensors as graph outputs (in place); returns `m`."""
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors if t not in have)
    return m


def session(model: onnx.ModelProto, threads: int | None = None):
    """An ONNX Runtime session on an in-memory model; one over protobuf's 2 GB
    limit (vit-h14) goes through a temporary file with its weights beside it."""
    import onnxruntime as ort

    from .backends.onnxruntime_backend import session_options
    so = session_options(threads)
    # No second, pre-packed copy of every weight: calibration runs a few batches, and
    # for vit-h14 that copy is 2.5 GB of peak memory.
    so.add_session_config_entry("session.disable_prepacking", "1")
    if not onnx_io.has_external(model) and not onnx_io.is_large(model):
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="vit-deploy-") as tmp:
        # Saved from a copy: saving moves the weights out of the message it saves. A model
        # held lazily (onnx_io.load_lazy) copies without its weights, which are streamed
        # from their files into the temporary one; ONNX Runtime maps that file.
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx_io.save(copy, Path(tmp) / "model.onnx", external=True)
        del copy
        # The session holds its own copy of the weights once built, so the files can go.
        return ort.InferenceSession(str(Path(tmp) / "model.onnx"), so, providers=["CPUExecutionProvider"])


def fixed_batch(sess) -> int | None:
    """The batch size the graph was exported with, where it fixed one (files from other tools
    often take exactly 1 image); None for a dynamic batch."""
    dim = sess.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else None


def run_batch(sess, images: np.ndarray, names: list[str] | None = None) -> list[np.ndarray]:
    """sess.run on `images`; for a graph with a fixed batch of N, in runs of exactly N (the last
    one filled up with copies of its last image), outputs cut back to the images given."""
    inp = sess.get_inputs()[0].name
    fixed = fixed_batch(sess)
    if fixed is None or fixed == len(images):
        return sess.run(names, {inp: images})
    parts = []
    for i in range(0, len(images), fixed):
        chunk = images[i:i + fixed]
        n = len(chunk)
        if n < fixed:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
        parts.append([o[:n] if o.ndim and o.shape[0] == fixed else o for o in sess.run(names, {inp: chunk})])
    if len(parts) == 1:
        return parts[0]
    return [np.concatenate(p) if p[0].ndim else p[0] for p in zip(*parts)]


def batches(x: np.ndarray, size: int = 8):
    for i in range(0, len(x), size):
        yield x[i:i + size]


OUTPUT_BUDGET = 256 << 20  # bytes of exposed intermediate outputs per run


def _outputs_over(model: onnx.ModelProto, tensors: list[str], images: np.ndarray, label: str):
    """Yield {tensor: value} per batch of images. Every quantized tensor is a graph output
    here, so a run returns them all at once: the first run takes one image, and the batch
    is then sized to keep those outputs within OUTPUT_BUDGET (a hybrid's early conv maps
    or vit-h14's 32 layers at batch 8 would take gigabytes)."""
    have = len(model.graph.output)
    add_outputs(model, tensors)  # in place, removed again below: no copy of the weights
    try:
        sess = session(model)
    finally:
        del model.graph.output[have:]
    yield from _run_budgeted(sess, tensors, images, label)


def _run_budgeted(sess, tensors: list[str], images: np.ndarray, label: str):
    names = [o.name for o in sess.get_outputs()]
    want = [names.index(t) for t in tensors]
    fixed = fixed_batch(sess)
    i, size = 0, fixed or 1
    with progress_bar(len(images), label) as bar:
        while i < len(images):
            batch = images[i:i + size]
            outs = run_batch(sess, batch)
            yield {t: outs[j] for t, j in zip(tensors, want)}
            per_image = sum(outs[j].nbytes for j in want) / len(batch)
            i += len(batch)
            bar(len(batch))
            size = fixed or int(max(1, min(8, OUTPUT_BUDGET // max(per_image, 1))))


def _channels_last(x: np.ndarray, conv_input: bool = False) -> np.ndarray:
    """Rows of channel values: [..., C] -> [rows, C]; a Conv's input [N, C, H, W] -> [N*H*W, C]."""
    if conv_input and x.ndim > 2:
        x = np.moveaxis(x, 1, -1)
    return x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(-1, 1)


def conv_inputs(model: onnx.ModelProto) -> set[str]:
    """Tensors a Conv reads as its data input: their channels are axis 1. A rank-4 tensor
    that a Linear reads is channels-last (timm's Swin: [B, H, W, C] before its
    patch-merging Linear); taking its axis 1 there gave 28 "channels" for 192, and outlier
    migration, bias correction and GPTQ each skipped that Linear without a word."""
    return {n.input[0] for n in model.graph.node if n.op_type == "Conv"}


SAMPLE_ROWS = 512  # token rows kept per sampled tensor, for choosing the outlier migration


def collect_channel_stats(model: onnx.ModelProto, tensors: list[str], images: np.ndarray,
                          sample: tuple[str, ...] = ()) -> tuple[dict[str, ChannelStats], dict[str, np.ndarray]]:
    """Pass 1: per-channel statistics of every tensor, and a random sample of rows of the
    tensors in `sample`. A NaN or Inf anywhere is the user's model or images: stop, naming the tensor."""
    acc: dict[str, list] = {}
    rows_kept: dict[str, list] = {t: [] for t in sample}
    rng = np.random.default_rng(0)
    per_image = max(1, SAMPLE_ROWS // max(1, len(images)) + 1)
    images_like = conv_inputs(model)
    for outs in _outputs_over(model, tensors, images, "calibrating (pass 1/2: channel statistics)"):
        for t, x in outs.items():
            rows = _channels_last(x, t in images_like)
            if t in rows_kept:
                take = min(len(rows), per_image * len(x))
                rows_kept[t].append(rows[rng.choice(len(rows), take, replace=False)].copy())
            lo, hi = rows.min(0).astype(np.float64), rows.max(0).astype(np.float64)
            if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
                raise UserError(f"calibration: tensor '{t}' holds NaN or Inf values on the calibration images")
            a = [np.maximum(hi, -lo), lo, hi, rows.sum(0, dtype=np.float64), len(rows)]
            if t not in acc:
                acc[t] = a
            else:
                old = acc[t]
                acc[t] = [np.maximum(old[0], a[0]), np.minimum(old[1], a[1]), np.maximum(old[2], a[2]),
                          old[3] + a[3], old[4] + a[4]]
    samples = {t: np.concatenate(r)[:SAMPLE_ROWS * 2] for t, r in rows_kept.items() if r}
    return {t: ChannelStats(a[0], a[1], a[2], a[3] / max(a[4], 1)) for t, a in acc.items()}, samples


def collect_histograms(model: onnx.ModelProto, tensors: list[str], images: np.ndarray,
                       amax: dict[str, float]) -> dict[str, np.ndarray]:
    """Pass 2: a histogram of |x| over [0, amax] per tensor."""
    hists = {t: np.zeros(BINS, np.int64) for t in tensors}
    for outs in _outputs_over(model, tensors, images, "calibrating (pass 2/2: histograms)"):
        for t, x in outs.items():
            idx = (np.abs(x).ravel() * (BINS / (amax[t] or 1.0))).astype(np.int32)  # bincount: ~10x np.histogram
            np.minimum(idx, BINS - 1, out=idx)
            hists[t] += np.bincount(idx, minlength=BINS)
    return hists


GRAM_BUDGET = 768 << 20  # bytes of Gram matrices held at once (vit-b16: 537 MB, one pass; ViT-L: three)


def collect_grams(model: onnx.ModelProto, widths: dict[str, int], images: np.ndarray):
    """Yield {tensor: X^T X} (float32, [C, C], over every image's token rows) for groups of
    the tensors in `widths` ({tensor: C}), each group one pass over the images, sized to
    GRAM_BUDGET: the Gram matrices of a ViT-L's Linear inputs would take 2 GB at once.
    GPTQ's input (weight_rounding.py)."""
    group, size = [], 0
    for t, width in widths.items():
        if group and size + width * width * 4 > GRAM_BUDGET:
            yield _grams_of(model, group, images)
            group, size = [], 0
        group.append(t)
        size += width * width * 4
    if group:
        yield _grams_of(model, group, images)


def _grams_of(model: onnx.ModelProto, tensors: list[str], images: np.ndarray) -> dict[str, np.ndarray]:
    grams: dict[str, np.ndarray] = {}
    for outs in _outputs_over(model, tensors, images, "calibrating (weight rounding)"):
        for t, x in outs.items():
            rows = _channels_last(x).astype(np.float32, copy=False)  # Linear inputs: channels last
            g = rows.T @ rows
            if t in grams:
                grams[t] += g
            else:
                grams[t] = g
    return grams


def mse_threshold(hist: np.ndarray, amax: float, levels: int = LEVELS) -> float:
    """The clipping threshold T that minimizes the expected squared quantization error:
    rounding noise (T/levels)^2/12 for every value inside, (|x| - T)^2 for every value
    clipped. Outlier channels that carry many values keep T high; rare spikes do not."""
    h = hist.astype(np.float64)
    width = amax / len(h)
    centers = (np.arange(len(h)) + 0.5) * width
    thresholds = (np.arange(len(h)) + 1) * width
    inside = np.cumsum(h)                       # values in bins 0..k: rounded
    tail_n = h.sum() - inside                   # values in bins k+1..: clipped to T
    tail_s1 = (h * centers).sum() - np.cumsum(h * centers)
    tail_s2 = (h * centers ** 2).sum() - np.cumsum(h * centers ** 2)
    clip_err = tail_s2 - 2 * thresholds * tail_s1 + thresholds ** 2 * tail_n
    round_err = inside * (thresholds / levels) ** 2 / 12.0
    err = clip_err + round_err
    first = max(1, len(h) // 100)  # below 1% of the max is never the answer
    k = first + int(np.argmin(err[first:]))
    return float(thresholds[k])


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


def threshold(method: str, hist: np.ndarray | None, amax: float) -> float:
    """The clipping threshold of |x| for one tensor."""
    if method == "minmax" or hist is None or amax <= 0:
        return amax or 1.0
    edges = np.linspace(0.0, amax, BINS + 1)
    if method == "percentile":
        cdf = np.cumsum(hist) / max(1, hist.sum())
        t = float(edges[min(BINS, int(np.searchsorted(cdf, PERCENTILE / 100.0)) + 1)])
    elif method == "entropy":
        t = entropy_threshold(hist, edges[1:])
    else:
        t = mse_threshold(hist, amax)
    return t or amax or 1.0
