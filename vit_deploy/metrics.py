"""Output comparison shared by the parity check and the INT8 quantizer (numpy only)."""
from __future__ import annotations

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity per row (per image) of two batches of outputs (logits or embeddings)."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation per row (per image): the cosine of the rows less their means."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return cosine(a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True))
