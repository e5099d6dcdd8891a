"""Embeddings for one-shot verification: f(x) of unit length, two images the same identity
when the squared L2 distance between their embeddings is at most a threshold tau."""

from __future__ import annotations

import numpy as np


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def squared_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """||a - b||^2 row by row (N x D, N x D -> N); for unit vectors 2 - 2 cos, in [0, 4]."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return np.einsum("nd,nd->n", diff, diff)


def pairwise_squared_distances(x: np.ndarray) -> np.ndarray:
    """N x D -> N x N squared L2 distances."""
    x = np.asarray(x, dtype=np.float64)
    sq = np.einsum("nd,nd->n", x, x)
    return np.clip(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0, None)
