"""Plain-numpy definitions and small helpers shared by several test files (imported as a sibling module: tests/ has
no __init__)."""
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


def dot_dtypes(jaxpr) -> list[tuple[str, ...]]:
    """Operand dtypes of every dot_general in a jaxpr, sub-jaxprs (scan, cond, custom_vjp, pjit bodies) included."""
    out = []
    for e in jaxpr.eqns:
        if e.primitive.name == "dot_general":
            out.append(tuple(str(v.aval.dtype) for v in e.invars))
        for v in e.params.values():
            for j in (v if isinstance(v, (tuple, list)) else (v,)):
                if hasattr(j, "jaxpr") and hasattr(j.jaxpr, "eqns"):
                    out += dot_dtypes(j.jaxpr)
                elif hasattr(j, "eqns"):
                    out += dot_dtypes(j)
    return out
