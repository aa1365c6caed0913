"""Weight rounding that answers for the layer's output, not for each weight alone (GPTQ).

Rounding every weight to its nearest step (RTN) makes errors that add up along the input
axis as they fall. GPTQ (Frantar et al., 2022) rounds the input rows one at a time and
moves each row's rounding error onto the rows not yet rounded, weighted by how the
calibration activations correlate (the Gram matrix H = X^T X): the product x . W_q then
stays close to x . W on those activations, which is what the next layer reads. Scales,
ranges and the int8 format stay those of nearest rounding, so the file is the same kind
(symmetric per-channel int8, zero point 0: TensorRT-valid) and runs at the same speed.

Measured on the real DINOv2 ViT-S/14 with `python benchmarks/real_vit.py --iters 40`
(38 held-out photos, AVX2 EPYC, 2026-11-29), rows in input order (before the activation
order below): mean / worst output correlation 0.99892 /
0.99605 -> 0.99917 / 0.99635 on ONNX Runtime, 0.99891 / 0.99685 -> 0.99909 / 0.99521 on
OpenVINO (that worst image is chaotic: see the README). An ad-hoc probe in exact Q/DQ
arithmetic put the activations' error alone (float weights) at mean 0.99932.

Rows go in GPTQ's activation order (input_order: by falling energy of the input channel),
in pairs: a trained ViT's outlier channels are rounded first, while the most rows are left
to take up their error. On a synthetic Linear whose 6 outlier channels come last in input
order that cut the held-out error to about 0.35x (tests/test_quantize.py); on the real
DINOv2 it moved the mean correlation by -0.00008 to +0.00023 (`benchmarks/real_vit.py
--no-peers --iters 0`, with `--calib 10` and `--calib 20`, 2026-11-29; see the README).

Pair-safe weights (weight_pairs.py) keep their constraint: the second row of each pair
(2i, 2i+1) is rounded within what the first row's value leaves it.
"""
from __future__ import annotations

import sys

import numpy as np

from .weight_pairs import PAIR_LIMIT

# of the mean diagonal, added to H. GPTQ's paper uses 0.01; an ad-hoc probe on the real ViT (exact
# arithmetic, mean-centred H) gave mean / worst 0.99889 / 0.99596 at 0.01, 0.99918 / 0.99628 at 0.1
DAMP = 0.1
TORCH_FROM = 2048  # H this wide is worth importing torch for (~3 s) where it is not loaded yet
BLOCK = 128   # rows rounded per block before the rest is updated at once (BLAS-3, the paper's "lazy batch")


def inverse_factor(gram: np.ndarray) -> np.ndarray | None:
    """U, upper triangular with U^T U = (H + damping)^-1 (float32), the damping raised until
    H is positive definite; None if it never is. Through torch where it is installed: its
    Cholesky inverse took 0.6 s for a 3072-wide H where numpy's inv took 2.4 s (AVX2 EPYC)."""
    h = np.array(gram, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0  # an input never seen on the calibration images: nearest rounding there
    base = float(np.mean(np.diag(h)))
    for damp in (DAMP, 1.0, 10.0):
        hd = h + damp * base * np.eye(len(h))
        if "torch" in sys.modules or len(h) >= TORCH_FROM:
            try:
                return _factor_torch(hd)
            except ImportError:
                pass
            except RuntimeError:  # torch's "not positive-definite"
                continue
        try:
            return np.linalg.cholesky(np.linalg.inv(hd)).T.astype(np.float32)
        except np.linalg.LinAlgError:
            continue
    return None


def _factor_torch(h: np.ndarray) -> np.ndarray:
    import torch
    t = torch.from_numpy(h.astype(np.float32))  # float32 as GPTQ's own code: half the time of float64
    lower = torch.linalg.cholesky(t)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True).float().numpy()


def input_order(gram: np.ndarray) -> np.ndarray:
    """The order GPTQ rounds the input rows in: by falling input energy (H's diagonal), as
    GPTQ's "act-order" does, so that a trained ViT's outlier channels are rounded while the
    most rows are left to take up their error. Rows go in pairs (2i, 2i+1), kept together
    and in order for pair safety; an odd last row stays last."""
    d = np.diag(gram)
    m = len(d) - len(d) % 2
    pairs = np.argsort(-np.maximum(d[:m:2], d[1:m:2]), kind="stable")
    return np.concatenate([np.stack([2 * pairs, 2 * pairs + 1], 1).reshape(-1), np.arange(m, len(d))])


def factor_in_order(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(input_order, inverse_factor of H in that order): what round_in_order needs, once
    per input tensor (query, key and value share theirs)."""
    order = input_order(gram)
    return order, inverse_factor(gram[np.ix_(order, order)])


def round_in_order(w: np.ndarray, scale: np.ndarray, u: np.ndarray, order: np.ndarray, pair_safe: bool) -> np.ndarray:
    """round_rows on the rows of a [in, out] weight taken in `order` (factor_in_order), with
    nearest rounding's ranges; the steps come back in the weight's own row order."""
    q = np.empty(w.shape, np.int8)
    q[order] = round_rows(w[order], scale, tops_of(w, scale, 1), u, pair_safe)
    return q


def round_rows(w: np.ndarray, scale: np.ndarray, top: np.ndarray, u: np.ndarray, pair_safe: bool) -> np.ndarray:
    """Integer steps for a [in, out] weight with per-output-column `scale` and range
    +-`top`, rounded in input order with each row's error carried onto the later rows
    through `u` (inverse_factor of the inputs' Gram matrix). `pair_safe`: same-sign
    pairs of rows (2i, 2i+1) sum to at most PAIR_LIMIT steps in the columns whose top
    exceeds PAIR_LIMIT / 2."""
    w = np.array(w, np.float32)
    n = len(w)
    s = np.asarray(scale, np.float32).reshape(-1)
    top = np.asarray(top, np.float32).reshape(-1)
    limited = pair_safe & (top > PAIR_LIMIT // 2)
    pairs = bool(limited.any())
    q = np.zeros(w.shape, np.float32)
    for a in range(0, n, BLOCK):
        b = min(a + BLOCK, n)
        wb, ub = w[a:b], u[a:b, a:b]
        err = np.zeros_like(wb)
        for i in range(b - a):
            r = np.clip(np.round(wb[i] / s), -top, top)
            if pairs and (a + i) % 2 == 1:  # the pair's first row is rounded: stay within what it leaves
                first = q[a + i - 1]
                over = limited & (r * first > 0)
                r = np.where(over, np.sign(r) * np.minimum(np.abs(r), PAIR_LIMIT - np.abs(first)), r)
            q[a + i] = r
            err[i] = (wb[i] - r * s) / ub[i, i]
            wb[i + 1:] -= ub[i, i + 1:, None] * err[i]
        w[b:] -= u[a:b, b:].T @ err
    return q.astype(np.int8)


def tops_of(w: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """The per-channel range nearest rounding chose: scale = max|w| / top."""
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=red)
    return np.maximum(np.round(amax / np.maximum(scale, 1e-30)), 1)
