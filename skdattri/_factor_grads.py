"""Training gradients kept as layer factors: products with dense vectors, rows on demand.

For a hooked layer the per-sample weight gradient is ``G_j = sum_t g_jt a_jt^T``, so
the training side of an influence function -- scores ``x . grad_j`` of preconditioned
query gradients ``x`` and, for self-influence, blocks of gradient rows -- needs only
the factor rows of :mod:`skdattri.func.ghost` (``T (d_in + d_out)`` numbers a layer
instead of ``d_in d_out``): ``<X, G_j> = sum_t g_jt^T X a_jt``. For the 17,226-parameter
digits MLP that is 458 numbers a sample instead of 17,226; for the 101,770-parameter
Fashion-MNIST MLP 1,050 instead of 101,770.
"""

# Authors: The skdattri developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import torch

from .func.ghost import _factors
from .func.hooks import per_sample_layer_grads

#: Elements of the temporaries of :meth:`_FactorGradients.inner` (4 MB in float32).
_INNER_ELEMENTS = 2**20


class _FactorGradients:
    """Per-sample gradients over ``names`` held as factor rows (a store of
    ``layout.width`` columns), read like a store of ``(n, n_grad)`` gradient rows.

    ``rows[sl]`` forms the gradient rows of a slice (in the column order of ``names``);
    :meth:`inner` is ``X @ rows[sl].T`` from the factors, without forming them.
    """

    def __init__(self, factors, layout, sizes):
        self.factors, self.layout = factors, layout
        self.offsets, start = {}, 0
        for name, size in sizes.items():  # the flat gradient's columns, in names order
            self.offsets[name], start = slice(start, start + size), start + size
        self.n_grad = start
        # explicit columns of the factor rows -> columns of the gradient
        pairs, f = [], None
        for _, weight, bias, off in layout.dense:
            f = off
            for name in (weight, bias):
                if name:
                    size = self.offsets[name].stop - self.offsets[name].start
                    pairs.append((self.offsets[name], slice(f, f + size)))
                    f += size
        f = layout.rest_offset
        for name in layout.rest:
            size = self.offsets[name].stop - self.offsets[name].start
            pairs.append((self.offsets[name], slice(f, f + size)))
            f += size
        self.explicit = pairs

    @property
    def shape(self):
        return (self.factors.shape[0], self.n_grad)

    @property
    def dtype(self):
        return self.factors.dtype

    @property
    def device(self):
        return self.factors.device

    def __len__(self):
        return self.factors.shape[0]

    def __getitem__(self, rows):
        """Gradient rows of ``rows`` (a slice), shape ``(len, n_grad)``."""
        F = self.factors[rows]
        out = F.new_empty((F.shape[0], self.n_grad))
        for x_cols, f_cols in self.explicit:
            out[:, x_cols] = F[:, f_cols]
        for entry in self.layout.ghost:
            a, g = _factors(F, entry)
            weight, bias = entry[1], entry[2]
            out[:, self.offsets[weight]] = per_sample_layer_grads(a, g).flatten(1)
            if bias:
                out[:, self.offsets[bias]] = g.sum(1)
        return out

    def square_mean(self):
        """Mean over the rows of the squared gradient rows, ``(n_grad,)`` (the diagonal
        of the empirical Fisher): for a layer at one position ``sum_j g_j^2 (a_j^2)^T``
        is one product of the squared factors, no gradient row formed; layers at
        several positions form their rows a block at a time."""
        n = len(self)
        out = torch.zeros(self.n_grad, dtype=self.dtype, device=self.device)
        step = max(1, _INNER_ELEMENTS // max(1, self.factors.shape[1]))
        for start in range(0, n, step):
            F = self.factors[start:start + step]
            for x_cols, f_cols in self.explicit:
                out[x_cols] += F[:, f_cols].square().sum(0)
            for entry in self.layout.ghost:
                a, g = _factors(F, entry)
                weight, bias = entry[1], entry[2]
                if a.shape[1] == 1:
                    out[self.offsets[weight]] += (g[:, 0].square().T @ a[:, 0].square()).flatten()
                else:
                    grads = per_sample_layer_grads(a, g).flatten(1)
                    out[self.offsets[weight]] += grads.square_().sum(0)
                if bias:
                    out[self.offsets[bias]] += g.sum(1).square().sum(0)
        return out / n

    def inner(self, X, rows):
        """``X @ grad(rows).T`` for dense rows ``X`` of shape (m, n_grad): (m, len).

        Query rows go a few at a time, so that the one copy of a layer's part of ``X``
        that the products need stays within :data:`_INNER_ELEMENTS`."""
        F = self.factors[rows]
        out = X.new_zeros((X.shape[0], F.shape[0]))
        for x_cols, f_cols in self.explicit:
            out.addmm_(X[:, x_cols], F[:, f_cols].T)
        if not self.layout.ghost:
            return out
        widest = max(entry[4] * entry[5] for entry in self.layout.ghost)
        step = max(1, _INNER_ELEMENTS // widest)
        for entry in self.layout.ghost:
            a, g = _factors(F, entry)
            weight, bias, d_in, d_out = entry[1], entry[2], entry[4], entry[5]
            if bias:
                out.addmm_(X[:, self.offsets[bias]], g.sum(1).T)
            for s in range(0, X.shape[0], step):
                Xw = X[s:s + step, self.offsets[weight]].unflatten(1, (d_out, d_in))  # a view
                out[s:s + step] += _layer_inner(Xw, a, g)
        return out


def _layer_inner(Xw, a, g):
    """``sum_t g_jt^T Xw_i a_jt`` for every ``i`` and ``j``: (m, n).

    One matrix product over the larger side of the layer (``d_in`` or ``d_out``), then
    a product-sum over the smaller one and the positions, in blocks of train rows that
    keep the ``(n, T, m, d)`` temporary within :data:`_INNER_ELEMENTS`.
    """
    m, d_out, d_in = Xw.shape
    n, T = a.shape[0], a.shape[1]
    if d_out > d_in:  # contract d_out first: the roles of the two factors swap
        Xw, a, g = Xw.transpose(1, 2), g, a
        d_in, d_out = d_out, d_in
    right = Xw.reshape(m * d_out, d_in).T  # (d_in, m d_out)
    out = Xw.new_empty((m, n))
    step = max(1, _INNER_ELEMENTS // max(1, m * d_out * T))
    for s in range(0, n, step):
        e = min(s + step, n)
        # Y[j, t, i, o] = (Xw_i a_jt)_o; times g_jt and summed over o -- the contiguous
        # last axis, so each score is one row sum whatever the block (a reduction over
        # another axis is vectorised across the block, and its order then depends on the
        # block's size: top_k must give the very scores of transform) -- then over t
        Y = (a[s:e].reshape((e - s) * T, d_in) @ right).view(e - s, T, m, d_out)
        out[:, s:e] = Y.mul_(g[s:e, :, None, :]).sum(3).sum(1).T
    return out
