"""The empirical Fisher ``G^T G / n`` of per-sample gradients as a linear operator."""

from __future__ import annotations

import torch

from .._utils import _rows_per_block
from .hessian import LinearOperator, _as_block

__all__ = ["EmpiricalFisherOperator"]


class EmpiricalFisherOperator(LinearOperator):
    """``F = (1/n) sum_j g_j g_j^T + diag(l2)`` from cached per-sample gradients.

    The empirical Fisher (the mean outer product of the training gradients), the
    curvature dattri's ``ifvp`` functions call "empirical Fisher" and the one of
    ``InfluenceFunction(hessian="fisher")``. It is positive semi-definite for any model.
    Products cost two passes of matrix products over the rows of ``G`` (no
    differentiation); stochastic solvers see it as the mean of row blocks.

    Parameters
    ----------
    G : Tensor of shape (n, p)
        Per-sample gradients (referenced, not copied).
    l2 : float or Tensor of shape (p,), default=0.0
        Added to the diagonal (the Hessian of an L2 penalty of the objective).
    batch_size : int, default=None
        Rows of ``G`` per block of :meth:`iter_batches` (``None``: as many as fit the
        working-memory budget).

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.fisher import EmpiricalFisherOperator
    >>> G = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    >>> EmpiricalFisherOperator(G).to_dense()
    tensor([[1., 1.],
            [1., 2.]], dtype=torch.float64)
    """

    def __init__(self, G, *, l2=0.0, batch_size=None):
        if not hasattr(G, "shape") or len(G.shape) != 2 or G.shape[0] == 0:
            raise ValueError("G must be a non-empty 2-D tensor (or store) of per-sample "
                             "gradients (n, p).")
        super().__init__(G.shape[1], G.dtype, G.device)
        self.G = G
        self.l2 = l2
        self.batch_size = batch_size or _rows_per_block(G.shape[1])

    def _rows(self):
        n = self.G.shape[0]
        return [slice(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]

    def _product(self, rows, block):
        G = self.G[rows]
        out = (block @ G.T) @ G / G.shape[0]
        return out + self.l2 * block

    def matvec(self, V):
        block, was_1d = _as_block(V, self.p, self.dtype, self.device)
        out = torch.zeros_like(block)
        for rows in self._rows():
            G = self.G[rows]
            out += (block @ G.T) @ G
        out = out / self.G.shape[0] + self.l2 * block
        return out[0] if was_1d else out

    def iter_batches(self):
        n = self.G.shape[0]
        for rows in self._rows():
            yield rows, float(rows.stop - rows.start) / n

    def batch_matvec(self, batch, V):
        block, was_1d = _as_block(V, self.p, self.dtype, self.device)
        out = self._product(batch, block)
        return out[0] if was_1d else out
