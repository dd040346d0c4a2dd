"""The empirical Fisher ``G^T G / n`` of per-sample gradients as a linear operator."""

from __future__ import annotations

import numbers

import torch

from .._utils import _rows_per_block, _symmetric_from_upper
from .hessian import LinearOperator, _add_l2_, _as_block

__all__ = ["EmpiricalFisherOperator"]

#: Largest ``(n, n)`` float64 Gram matrix of the rows that :meth:`row_space` forms.
_ROW_GRAM_BYTES = 2**28


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
        return _add_l2_(((block @ G.T) / G.shape[0]) @ G, self.l2, block)

    def data_matvec(self, V):
        """The product without the L2 term: ``G^T G v / n`` for each row."""
        block, was_1d = _as_block(V, self.p, self.dtype, self.device)
        n = self.G.shape[0]
        out = None
        for rows in self._rows():
            G = self.G[rows]
            coef = (block @ G.T) / n  # (m, rows): the 1/n on the small factor
            out = coef @ G if out is None else out.addmm_(coef, G)
        out = torch.zeros_like(block) if out is None else out
        return out[0] if was_1d else out

    def matvec(self, V):
        block, was_1d = _as_block(V, self.p, self.dtype, self.device)
        out = _add_l2_(self.data_matvec(block), self.l2, block)
        return out[0] if was_1d else out

    def iter_batches(self):
        n = self.G.shape[0]
        for rows in self._rows():
            yield rows, float(rows.stop - rows.start) / n

    def batch_matvec(self, batch, V):
        block, was_1d = _as_block(V, self.p, self.dtype, self.device)
        out = self._product(batch, block)
        return out[0] if was_1d else out

    def _row_blocks(self):
        for rows in self._rows():
            yield rows, self.G[rows]

    def row_space(self):
        """An orthonormal basis of the span of the rows, on which ``F`` is diagonal.

        With ``K = G G^T = U diag(s) U^T``, the columns of ``Q = G^T W``,
        ``W = U diag(s)^(-1/2)``, are orthonormal, span the rows of ``G``, and
        ``F Q = Q diag(s / n + l2)``; on their complement ``F = l2 I``. Directions with
        ``s`` below ``n eps max(s)`` (rounding) are left to the complement.

        Returns ``None`` where this form does not pay or does not hold: at least as
        many rows as columns, a Gram matrix larger than 256 MiB, or a per-coordinate
        ``l2``.

        Returns
        -------
        W : Tensor of shape (n, r), float64
        s : Tensor of shape (r,), float64
            The eigenvalues of ``K`` kept (``F``'s are ``s / n + l2``).
        """
        n, p = self.G.shape
        if (n >= p or n * n * 8 > _ROW_GRAM_BYTES
                or not isinstance(self.l2, numbers.Real)):
            return None
        K = torch.zeros(n, n, dtype=self.dtype, device=self.device)
        blocks = list(self._rows())
        for i, rows_i in enumerate(blocks):  # the block pairs on and above the diagonal
            Gi = self.G[rows_i]
            for rows_j in blocks[i:]:
                Gj = Gi if rows_j == rows_i else self.G[rows_j]
                K[rows_i, rows_j] = Gi @ Gj.T
        s, U = torch.linalg.eigh(_symmetric_from_upper(K.double()))
        keep = s > n * torch.finfo(self.dtype).eps * max(float(s[-1]), 0.0)
        s, U = s[keep], U[:, keep]
        return U / s.sqrt(), s

    def row_coordinates(self, B):
        """``G B^T`` for a block ``B`` of shape (m, p): shape (n, m), float64."""
        out = torch.empty(self.G.shape[0], B.shape[0], dtype=torch.float64,
                          device=self.device)
        for rows, G in self._row_blocks():
            out[rows] = (G @ B.T).double()
        return out

    def from_row_coordinates(self, C):
        """``C G`` for ``C`` of shape (m, n): shape (m, p), in the operator's dtype."""
        C = C.to(self.dtype)
        out = torch.zeros(C.shape[0], self.p, dtype=self.dtype, device=self.device)
        for rows, G in self._row_blocks():
            out.addmm_(C[:, rows], G)
        return out
