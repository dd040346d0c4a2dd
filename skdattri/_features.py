"""Per-sample features of the attributors: gradients, projected a few rows at a time."""

# Authors: The skdattri developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import torch

from ._utils import _n_rows, _take_rows
from .func._grad import model_per_sample_grads

#: Bytes of per-sample gradients formed at once before they are projected (at least
#: ``_MIN_FUSED_ROWS`` rows, so that expanding a packed projection stays a small share of
#: the product): this, not ``batch_size``, bounds the gradient memory of a projected fit
#: and transform.
_FUSED_BYTES = 2**23
_MIN_FUSED_ROWS = 128


class _GradientFeatures:
    """Per-sample gradients over ``names``, projected by ``projector`` when there is one."""

    _buffer = None

    def __init__(self, model, names, projector):
        self.model, self.names, self.projector = model, names, projector

    @property
    def requires_fit(self):
        return self.projector is not None and self.projector.requires_fit

    def width(self, params):
        if self.projector is not None:
            return self.projector.out_dim
        return sum(params[k].numel() for k in self.names)

    def _grads(self, params, X, y, what, out=None):
        return model_per_sample_grads(self.model, params, X, y, what, names=self.names,
                                      out=out)

    def partial_fit(self, params, X, y, what):
        self.projector.partial_fit(self._grads(params, X, y, what))

    def finalize(self):
        self.projector.finalize()

    def __call__(self, params, X, y, what, out=None):
        n = _n_rows(X)
        if self.projector is None or n == 0:
            return self._grads(params, X, y, what, out=out)
        # Projected: the gradients of a few rows at a time into one reused buffer, each
        # part projected while it is still in the CPU's last-level cache (one (batch,
        # n_params) block would go to memory and back; 1.4x faster for the 101,770-
        # parameter MLP at batches of 256); each row's projection depends on that row only
        p = self._n_grad(params)
        dtype = next(iter(params.values())).dtype
        step = min(n, max(_MIN_FUSED_ROWS, _FUSED_BYTES // max(1, p * dtype.itemsize)))
        buf = self._buffer
        if buf is None or buf.shape[0] < step or buf.shape[1] != p or buf.dtype != dtype:
            buf = self._buffer = torch.empty(step, p, dtype=dtype, device=self.projector.device)
        if out is None:
            out = torch.empty(n, self.projector.out_dim, dtype=self.projector.dtype,
                              device=self.projector.device)
        for s in range(0, n, step):
            part = slice(s, min(s + step, n))
            G = self._grads(params, _take_rows(X, part), _take_rows(y, part), what,
                            out=buf[: part.stop - part.start])
            out[part] = self.projector(G)
        return out

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_buffer", None)  # a work buffer: never pickled (sharded fit)
        return state

    def _n_grad(self, params):
        return sum(params[k].numel() for k in self.names)
