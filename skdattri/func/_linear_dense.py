"""The dense closed-form curvature of a linear model (:class:`LinearModelOperator`).

``H = sum_n w_n A_n (x) xa_n xa_n^T`` (``A_n`` the output Hessian of sample ``n``,
``xa = [x, 1]`` restricted to the differentiated columns), symmetrised. With ``A_n``
replaced by its symmetric part ``(A_n + A_n^T) / 2`` (the same symmetrised result)
entry ``(c a, l b)`` depends only on the unordered pairs ``{c, l}`` and ``{a, b}``:
one GEMM ``(class pairs, samples) @ (samples, column pairs)`` per chunk of rows -- a
quarter of the products of the full ``(k d)^2`` contraction -- and an exactly
symmetric matrix.
"""

from __future__ import annotations

import torch

#: Elements of the per-chunk temporaries (column-pair products of a chunk of rows).
_DENSE_CHUNK_ELEMENTS = 2**21
#: Fewest sample rows per chunk (then the column pairs come in groups).
_DENSE_MIN_ROWS = 256


def _linear_model_dense(op):
    """``op.to_dense()`` of a :class:`~skdattri.func.hessian.LinearModelOperator`."""
    k, d = op.weight.shape
    device = op.device
    has_w = op.weight_name in op.params
    has_b = op.bias_name in op.params
    cols = (d if has_w else 0) + (1 if has_b else 0)
    ck, lk = torch.triu_indices(k, k, device=device)
    ca, la = torch.triu_indices(cols, cols, device=device)
    upper, lower = ck * k + lk, lk * k + ck
    packed = torch.zeros((ck.numel(), ca.numel()), dtype=op.dtype, device=device)
    # rows per chunk: the (column pairs, rows) products within the budget, but at
    # least _DENSE_MIN_ROWS rows (then the column pairs come in groups)
    step = max(_DENSE_MIN_ROWS, _DENSE_CHUNK_ELEMENTS // ca.numel())
    weight_sum = 0.0
    for batch, w in op.batches:
        A = op._batch_hessians(batch)  # (n, k, k)
        X = batch[0]
        n = X.shape[0]
        parts = [X.reshape(n, -1).to(op.dtype)] if has_w else []
        if has_b:
            parts.append(torch.ones((n, 1), dtype=op.dtype, device=device))
        Xa = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        scale = float(w) / n
        size = -(-n // -(-n // step))  # equal chunks
        for s in range(0, n, size):
            As = A[s:s + size].reshape(-1, k * k)
            Ap = (As.index_select(1, upper) + As.index_select(1, lower)).mul_(0.5 * scale)
            _add_pair_products(packed, Ap, Xa[s:s + size].T.contiguous())
        weight_sum += float(w)
    packed /= weight_sum
    pair_k = torch.zeros((k, k), dtype=torch.long, device=device)
    pair_k[ck, lk] = pair_k[lk, ck] = torch.arange(ck.numel(), device=device)
    pair_a = torch.zeros((cols, cols), dtype=torch.long, device=device)
    pair_a[ca, la] = pair_a[la, ca] = torch.arange(ca.numel(), device=device)
    # class and column of every flat parameter index, in dict order
    row_c, row_a = [], []
    classes = torch.arange(k, device=device)
    for name in op.params:
        if name == op.weight_name:
            row_c.append(classes.repeat_interleave(d))
            row_a.append(torch.arange(d, device=device).repeat(k))
        else:
            row_c.append(classes)
            row_a.append(torch.full((k,), cols - 1, device=device))
    row_c, row_a = torch.cat(row_c), torch.cat(row_a)
    dense = torch.empty((op.p, op.p), dtype=op.dtype, device=device)
    flat = packed.view(-1)
    # every class has its rows at the same columns: one (rows of a class, p) index of
    # column pairs, shifted by the class pairs of each class
    rows = [(row_c == c).nonzero()[:, 0] for c in range(k)]
    col_pairs = pair_a.index_select(0, row_a[rows[0]]).index_select(1, row_a)
    for c in range(k):  # the rows of one class at a time (small index temporaries)
        index = col_pairs + (pair_k[c].index_select(0, row_c) * packed.shape[1])
        dense.index_copy_(0, rows[c], flat.take(index))
    if op.l2 is not None:
        dense.diagonal().add_(op.l2)
    return dense


def _add_pair_products(packed, Ap, Xt):
    """``packed += Ap^T Q`` with ``Q[n, (a, b)] = X[n, a] X[n, b]`` for the column pairs
    ``a <= b`` in row-major (``triu_indices``) order; ``Xt = X^T`` contiguous, shape
    ``(cols, rows)``. ``Q^T`` is written a group of consecutive ``a`` at a time, each
    group's ``(pairs, rows)`` within :data:`_DENSE_CHUNK_ELEMENTS` (one ``a`` at least),
    from contiguous rows of ``Xt`` (no gather)."""
    cols, rows = Xt.shape
    ApT = Ap.T
    budget = max(cols, _DENSE_CHUNK_ELEMENTS // max(1, rows))
    a = off = 0
    while a < cols:
        stop, width = a, 0
        while stop < cols and (stop == a or width + cols - stop <= budget):
            width += cols - stop
            stop += 1
        Qt = Xt.new_empty((width, rows))
        pos = 0
        for b in range(a, stop):
            torch.mul(Xt[b:b + 1], Xt[b:], out=Qt[pos:pos + cols - b])
            pos += cols - b
        packed[:, off:off + width].addmm_(ApT, Qt.T)
        a, off = stop, off + width


class _NativeRows:
    """A linear model's rows in its own layout: ``(m, k, c)``, the ``d`` weight columns of
    each class then its bias (``c = d + 1``; ``c = d`` without a bias), contiguous.

    In it a batch's curvature product is two GEMMs with the inputs ``[x, 1]`` (no
    gather of the weight part, no separate bias terms) and the mean's ``1 / n`` and the
    L2 term ride on the second one: a recursion of many products of one block
    (:class:`~skdattri.func.ihvp.LissaIHVP`) converts its rows once at each end.
    """

    def __init__(self, op):
        self.op = op
        k, d = op.weight.shape
        self.k, self.d = k, d
        self.has_b = op.bias_name in op.params
        self.c = d + 1 if self.has_b else d
        self._inputs = {}
        l2 = op.l2
        if isinstance(l2, torch.Tensor):
            self.l2 = self.to_native(l2[None])[0]  # (k, c)
        else:
            self.l2 = float(l2) if l2 else None

    def to_native(self, block):
        """``(m, p)`` rows -> ``(m, k, c)``."""
        m, k, d = block.shape[0], self.k, self.d
        out = block.new_empty((m, k, self.c))
        start = 0
        for name, ref in self.op.params.items():
            piece = block[:, start:start + ref.numel()]
            if name == self.op.weight_name:
                out[:, :, :d] = piece.view(m, k, d)
            else:
                out[:, :, d] = piece
            start += ref.numel()
        return out

    def from_native(self, rows):
        """``(m, k, c)`` -> ``(m, p)`` rows in the operator's parameter order."""
        m, k, d = rows.shape[0], self.k, self.d
        out = rows.new_empty((m, self.op.p))
        start = 0
        for name, ref in self.op.params.items():
            part = out[:, start:start + ref.numel()]
            if name == self.op.weight_name:
                part.view(m, k, d).copy_(rows[:, :, :d])
            else:
                part.copy_(rows[:, :, d])
            start += ref.numel()
        return out

    def _input(self, batch):
        key = id(batch)
        if key not in self._inputs:
            X = batch[0].reshape(batch[0].shape[0], -1).to(self.op.dtype)
            if self.has_b:
                X = torch.cat([X, X.new_ones((X.shape[0], 1))], dim=1)
            self._inputs[key] = (batch, X.contiguous())  # the batch keeps its id alive
        return self._inputs[key][1]

    def batch_matvec(self, batch, V):
        """``(A_batch + diag(l2)) v`` of every row ``v`` of ``V`` (``(m, k, c)``)."""
        X = self._input(batch)
        n, (m, k, c) = X.shape[0], V.shape
        U = (X @ V.view(m * k, c).T).view(n, m, k)
        HU = self.op._output_products(batch, X[:, :self.d], U)
        if self.l2 is None:
            base, beta = V.new_empty((m * k, c)), 0.0
        else:
            base, beta = (V * self.l2).view(m * k, c), 1.0
        return base.addmm_(HU.view(n, m * k).T, X, beta=beta, alpha=1.0 / n).view(m, k, c)
