"""Full 8-bit weights that x86 CPUs without VNNI still compute exactly.

Without VNNI, the x86 INT8 kernels of ONNX Runtime and OpenVINO (VPMADDUBSW) multiply
uint8 activations by int8 weights and add each pair of products along the input axis,
rows 2i and 2i+1 of a [in, out] weight, into a saturating int16. A pair of same-sign
weights with |w1| + |w2| > 128 can exceed 32767 (255 x 128 = 32640 fits); opposite
signs never can (255 x 127). Measured under `qemu-x86_64 -cpu Haswell`, both runtimes,
2026-11-28: a column of 127s gave 771 for 97536, pairs (2i+1, 2i+2) of 127s stayed exact,
and rows 2i, 2i+1 at 127 and 1 stayed exact.

Halving every weight's range (7 bits, +-63) is the blunt fix and doubles the weight
rounding error. Here the weights keep +-127 steps and only the rare same-sign pairs over
128 are pulled back onto |w1| + |w2| = 128, each by half the excess (the least squared
change); per output column, 7 bits are kept instead where they would err less (a column
with a few dominant rows, as outlier migration makes). Rows along the input axis only:
convolutions pack their input differently, so they keep 7 bits.
"""
from __future__ import annotations

import numpy as np

PAIR_LIMIT = 128  # 255 x 128 = 32640 <= 32767
TOPS = (127, 111, 95, 79, 63)  # per column, the range that errs least (63: no pair can exceed)


def fits(q: np.ndarray, k_axis: int) -> bool:
    """Every same-sign pair of rows (2i, 2i+1) along `k_axis` sums to at most PAIR_LIMIT."""
    q = np.moveaxis(np.asarray(q, np.int16), k_axis, 0)
    if len(q) % 2:
        q = q[:-1]
    a, b = q[0::2], q[1::2]
    return bool(np.all((a * b <= 0) | (np.abs(a) + np.abs(b) <= PAIR_LIMIT)))


def _project(r: np.ndarray) -> np.ndarray:
    """Integer steps for real steps r ([in, out], |r| <= 127): rounded, then each same-sign
    pair over PAIR_LIMIT moved onto the limit."""
    q = np.round(r)
    n = len(q) - len(q) % 2
    a, b = q[0:n:2], q[1:n:2]
    ra, rb = np.abs(r[0:n:2]), np.abs(r[1:n:2])
    over = (a * b > 0) & (np.abs(a) + np.abs(b) > PAIR_LIMIT)
    if over.any():
        d = (ra + rb - PAIR_LIMIT) / 2
        new_a = np.clip(np.round(ra - d), PAIR_LIMIT - 127, 127)
        new_b = PAIR_LIMIT - new_a
        a[over] = (np.sign(a) * new_a)[over]
        b[over] = (np.sign(b) * new_b)[over]
        q[0:n:2], q[1:n:2] = a, b
    return q


def quantize_pair_safe(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel (`axis` of a 2-D weight) symmetric int8: (values, scale), each
    column either +-127 steps made pair-safe or +-63 steps, whichever errs less."""
    wt = np.moveaxis(np.asarray(w, np.float32), 1 - axis, 0)  # [in, out]
    amax = np.maximum(np.abs(wt).max(axis=0), 1e-12)
    best_q, best_s, best_e = None, None, None
    for top in TOPS:
        s = amax / top
        q = _project(np.clip(wt / s, -top, top))
        e = ((q * s - wt) ** 2).sum(axis=0)
        if best_e is None:
            best_q, best_s, best_e = q, s, e
        else:
            better = e < best_e
            best_q = np.where(better[None, :], q, best_q)
            best_s, best_e = np.where(better, s, best_s), np.minimum(e, best_e)
    return np.moveaxis(best_q.astype(np.int8), 0, 1 - axis), best_s.astype(np.float32)
