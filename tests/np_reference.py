"""Plain-numpy definitions shared by several test files (imported as a sibling module: tests/ has no __init__)."""
import numpy as np


def np_sinkhorn(c, iters, eps):
    """mHC Sinkhorn (spec 2.2) in numpy, in the dtype of c: row softmax + eps, a column normalisation, then
    iters - 1 (row, column) normalisation pairs."""
    c = np.exp(c - c.max(-1, keepdims=True))
    c = c / c.sum(-1, keepdims=True) + eps
    c = c / (c.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdims=True) + eps)
        c = c / (c.sum(-2, keepdims=True) + eps)
    return c
