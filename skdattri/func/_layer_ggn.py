"""Gauss-Newton products from layer factors: no Jacobian, no autodiff per vector.

For a layer ``z = W a`` (``nn.Linear`` on ``(n, d_in)`` inputs, the bias as a last
column of ones) the Jacobian of output ``c`` of sample ``i`` with respect to ``W`` is
the outer product ``g_ic a_i^T``, with ``g_ic = d f_ic / d z_i`` (one backward pass per
output, ``k`` in all, for the whole batch). A Gauss-Newton product then needs neither
the ``(n k, p)`` Jacobian nor one forward-and-backward pass per vector:

- ``(J v)_ic = sum_l g^l_ic . (V^l a^l_i)``: one GEMM ``A^l V^l^T`` per layer, then a
  batched product with the ``g``;
- ``u_i = Lambda_i (J v)_i / n`` with ``Lambda_i`` the loss's Hessian at the outputs;
- ``(J^T u)^l = sum_i (sum_c u_ic g^l_ic) a^l_i^T``: a batched product, then one GEMM.

That is about ``4 n p`` flops per vector whatever the number of outputs, against about
``4 n p`` for each of the ``jvp`` and ``vjp`` through the network that
:class:`~skdattri.func.hessian.GGNOperator` runs per vector, plus their ``vmap``. A layer
applied at several positions (sequences, convolutions) keeps its per-output Jacobian
``sum_t g_ict a_it^T`` instead, ``(n, k, p_l)``. The factors of a list of batches are
computed once, when the operator is made (up to a memory budget; past it, per product).
"""

from __future__ import annotations

import torch

from .._config import get_config
from ._grad import _hook_layers
from .hessian import GGNOperator, LinearOperator, _as_block, _BatchedOperator
from .hooks import LayerCapture, weight_layout

__all__ = ["GGNFactory", "LayerGGNOperator", "layer_ggn_plan"]

#: most outputs for which the per-output backward passes pay off (else GGNOperator)
_MAX_OUTPUTS = 64
#: elements of the largest intermediate of one chunk of vectors
_CHUNK_ELEMENTS = 2**23
#: largest per-output Jacobian of the layers applied at several positions, per batch
_JACOBIAN_ELEMENTS = 2**25
#: factors kept for later products over the same batches
_CACHE_BYTES = 2**28


def layer_ggn_plan(model, names):
    """The layers of :class:`LayerGGNOperator` for the parameters ``names``, or None.

    None when a parameter is outside the supported layers (``nn.Linear``, Hugging Face
    ``Conv1D``, ``nn.Conv1d/2d`` with one group and zero padding; not tied), or when
    :func:`skdattri.set_config` forces the ``vmap`` engine.

    Parameters
    ----------
    model : TorchModel
    names : list of str

    Returns
    -------
    plan : list of (str, torch.nn.Module, str or None, str or None) or None
        ``(layer, module, weight name, bias name)``, a name None when not in ``names``.
    """
    if get_config()["grad_engine"] == "vmap" or not names:
        return None
    layers = _hook_layers(model, names)
    covered = {w for _, wn, bn in layers.values() for w in (wn, bn) if w}
    if covered != set(names):
        return None
    return [(k, mod, w, b) for k, (mod, w, b) in layers.items()]


class LayerGGNOperator(_BatchedOperator):
    """Generalised Gauss-Newton products of a network from its layer factors.

    The same operator as :class:`~skdattri.func.hessian.GGNOperator` (mean over the
    batches of ``J_b^T Lambda_b J_b`` plus ``diag(l2)``), for parameters that all
    belong to the layers of :func:`layer_ggn_plan`. A batch whose outputs are not a
    ``(n, k)`` matrix with at most 64 columns, or whose layers are not called on it
    batch-wise, goes through ``fallback`` instead.

    Parameters
    ----------
    model : TorchModel
        The functional model (its ``forward`` and its loss's ``output_hessians``).
    params : dict of str to Tensor
        The parameters of the flat space, in its order.
    batches : re-iterable
        ``(X, y)`` batches or ``((X, y), weight)`` pairs.
    plan : list
        From :func:`layer_ggn_plan`.
    fallback : GGNOperator or callable
        The same curvature through ``torch.func``, or a function that makes it (called
        when a batch first needs it).
    frozen : dict of str to Tensor, default=None
        The other parameters of the model, held fixed.
    l2 : float, dict or Tensor of shape (p,), default=0.0
    cache_bytes : int, default=2**28
        Most bytes of factors kept (computed when the operator is made, for a list of
        batches); past it they are recomputed for every product.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skdattri.model import make_model
    >>> from skdattri.func._layer_ggn import LayerGGNOperator, layer_ggn_plan
    >>> from skdattri.func.hessian import GGNOperator
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> model = make_model(net, loss="cross_entropy")
    >>> params = model.named_params()
    >>> batches = [(torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1] * 3))]
    >>> _, outputs, loss = model.curvature_functions({})
    >>> ref = GGNOperator(outputs, loss, params, batches)
    >>> op = LayerGGNOperator(model, params, batches, layer_ggn_plan(model, list(params)),
    ...                       fallback=ref)
    >>> V = torch.randn(2, op.p, dtype=torch.float64)
    >>> bool(torch.allclose(op.matvec(V), ref.matvec(V)))
    True
    """

    def __init__(self, model, params, batches, plan, fallback, *, frozen=None, l2=0.0,
                 cache_bytes=_CACHE_BYTES):
        super().__init__(params, batches, l2, None, True)
        self.model, self.plan, self._fallback = model, list(plan), fallback
        self.frozen = {k: v.detach() for k, v in (frozen or {}).items()}
        self.cache_bytes = cache_bytes
        self._offsets, off = {}, 0
        for k, v in self.params.items():
            self._offsets[k], off = off, off + v.numel()
        self._prepare()

    def _prepare(self):
        """Factors of the batches of a list (up to ``cache_bytes``), computed here once so
        that products only read them (``_factor_list``: ``(batch, weight, factors)``);
        the fallback made here if a batch needs it or is not kept."""
        self._factor_list, self._complete = [], isinstance(self.batches, (list, tuple))
        used = 0
        for batch, weight in (self.iter_batches() if self._complete else ()):
            factors = self._factors(batch) if weight else None
            used += _nbytes(factors)
            if used > self.cache_bytes:
                self._factor_list, self._complete = [], False
                break
            self._factor_list.append((batch, weight, factors))
        if not self._complete or any(f is None and w for _, w, f in self._factor_list):
            self.fallback  # noqa: B018 (made now: products change no state)

    @property
    def fallback(self):
        """The :class:`~skdattri.func.hessian.GGNOperator` for the batches without
        factors."""
        if not isinstance(self._fallback, LinearOperator):
            self._fallback = self._fallback()
        return self._fallback

    # ---- factors of one batch --------------------------------------------------------
    def _factors_of(self, batch):
        for cached, _, factors in self._factor_list:
            if cached is batch:
                return factors
        return self._factors(batch)

    def _factors(self, batch):
        """``(layers, Lambda / n)``: per layer ``(entry, a, g, J)`` (``a (n, d_in')`` and
        ``g (n, k, d_out)`` for a layer called once per sample, else ``J (n, k, p_l)``),
        or None when the batch needs the fallback."""
        X, y = batch
        live = {k: v.detach().requires_grad_(True) for k, v in self.params.items()}
        with torch.enable_grad(), LayerCapture([(k, m) for k, m, _, _ in self.plan]) as cap:
            out = self.model.forward({**self.frozen, **live}, X)
            if out.dim() != 2 or out.shape[1] > _MAX_OUTPUTS:
                return None
            n, k = out.shape
            try:
                inputs = cap.inputs()
            except ValueError:  # a layer that did not run
                return None
            if any(a.shape[0] != n for a in inputs.values()):
                return None
            jacobian = sum(n * k * _width(e, inputs[e[0]]) * weight_layout(e[1])[0][0]
                           for e in self.plan if inputs[e[0]].shape[1] > 1)
            if jacobian > _JACOBIAN_ELEMENTS:
                return None
            grads = cap.output_grads([out[:, c].sum() for c in range(k)])
        layers = []
        for entry in self.plan:
            name, mod, weight, bias = entry
            a = inputs[name]
            if mod.bias is not None and bias is None:
                a = a[..., :-1]
            elif weight is None:
                a = a[..., -1:]
            g = grads[name].permute(1, 0, 2, 3)  # (n, k, T, d_out)
            if a.shape[1] == 1:
                layers.append((entry, a[:, 0].contiguous(), g[:, :, 0].contiguous(), None))
            else:
                J = torch.einsum("nkto,nti->nkoi", g, a).reshape(n, k, -1)
                layers.append((entry, None, None, J))
        lam = self.model.loss_.output_hessians(out.detach(), y) / n
        return layers, lam

    # ---- products --------------------------------------------------------------------
    def _weights(self, block, entry):
        """The vectors' ``(m, d_out, d_in')`` matrices of one layer (bias last)."""
        _, mod, weight, bias = entry
        m = block.shape[0]
        parts = []
        if weight is not None:
            (d_out, *_), transposed = weight_layout(mod)
            w = block[:, self._offsets[weight]:self._offsets[weight] + mod.weight.numel()]
            w = w.view(m, -1, d_out).transpose(1, 2) if transposed else w.view(m, d_out, -1)
            parts.append(w)
        if bias is not None:
            parts.append(block[:, self._offsets[bias]:self._offsets[bias] + mod.bias.numel(),
                               None])
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=2)

    def _scatter(self, out, entry, R):
        _, mod, weight, bias = entry
        m = out.shape[0]
        if weight is not None:
            (d_out, *_), transposed = weight_layout(mod)
            w = out[:, self._offsets[weight]:self._offsets[weight] + mod.weight.numel()]
            d_in = mod.weight.numel() // d_out
            if transposed:
                w.view(m, d_in, d_out).copy_(R[:, :, :d_in].transpose(1, 2))
            else:
                w.view(m, d_out, d_in).copy_(R[:, :, :d_in])
        if bias is not None:
            out[:, self._offsets[bias]:self._offsets[bias] + mod.bias.numel()] = R[:, :, -1]

    def _accumulate(self, factors, Ws, acc, weight):
        """``acc[l] += weight * (J^T Lambda J V)^l`` of one batch, vectors in chunks."""
        layers, lam = factors
        m, (n, k) = Ws[0].shape[0], lam.shape[:2]
        widest = max([k] + [W.shape[1] for W in Ws])
        step = max(1, _CHUNK_ELEMENTS // (n * widest))
        for start in range(0, m, step):
            stop = min(start + step, m)
            r = stop - start
            jv = lam.new_zeros((n, r, k))
            for (_, a, g, J), W in zip(layers, Ws, strict=True):
                W = W[start:stop]
                if J is None:  # (n, r d_out): every vector's V^l a_i
                    U = a @ W.reshape(-1, W.shape[2]).T
                    jv.baddbmm_(U.view(n, r, -1), g.transpose(1, 2))
                else:
                    jv += (J.reshape(n * k, -1) @ W.reshape(r, -1).T).view(n, k, r).transpose(1, 2)
            u = torch.bmm(jv, lam)  # Lambda_i symmetric
            for (_, a, g, J), R in zip(layers, acc, strict=True):
                if J is None:
                    d_out = R.shape[1]
                    R.view(m * d_out, -1)[start * d_out:stop * d_out].addmm_(
                        torch.bmm(u, g).reshape(n, r * d_out).T, a, alpha=weight)
                else:
                    R.view(m, -1)[start:stop].addmm_(
                        u.transpose(1, 2).reshape(n * k, r).T, J.reshape(n * k, -1),
                        alpha=weight)

    def _mean_product(self, pairs, block):
        """``sum_b w_b G_b V / sum_b w_b`` over ``(batch, weight)`` pairs (no l2)."""
        Ws = acc = None
        rest, weight_sum = None, 0.0
        for batch, weight, *kept in pairs:
            if weight == 0:
                continue
            weight_sum += weight
            factors = kept[0] if kept else self._factors_of(batch)
            if factors is None:
                part = self.fallback._curvature(batch, block) * weight
                rest = part if rest is None else rest + part
                continue
            if Ws is None:
                Ws = [self._weights(block, e) for e in self.plan]
                acc = [torch.zeros_like(W) for W in Ws]
            self._accumulate(factors, Ws, acc, weight)
        if weight_sum == 0:
            raise ValueError("batches is empty (or all its weights are zero).")
        if acc is None:
            return rest / weight_sum
        out = torch.zeros_like(block)  # every column belongs to a layer of the plan
        for entry, R in zip(self.plan, acc, strict=True):
            self._scatter(out, entry, R)
        if rest is not None:
            out += rest
        return out.div_(weight_sum)

    def _curvature(self, batch, block):
        return self._mean_product([(batch, 1.0)], block)

    def data_matvec(self, V):
        block, was_1d = _as_block(V, self.p, self.dtype, self.device)
        pairs = self._factor_list if self._complete else self.iter_batches()
        out = self._mean_product(pairs, block)
        return out[0] if was_1d else out


class GGNFactory:
    """Makes the :class:`~skdattri.func.hessian.GGNOperator` of its arguments when
    called (the fallback of :class:`LayerGGNOperator`, made only when needed)."""

    def __init__(self, output_fn, output_loss_fn, params, batches, *, l2=0.0):
        self.output_fn, self.output_loss_fn = output_fn, output_loss_fn
        self.params, self.batches, self.l2 = params, batches, l2

    def __call__(self):
        return GGNOperator(self.output_fn, self.output_loss_fn, self.params, self.batches,
                           l2=self.l2)


def _nbytes(factors):
    if factors is None:
        return 0
    layers, lam = factors
    return lam.numel() * lam.element_size() + sum(
        t.numel() * t.element_size() for entry in layers for t in entry[1:] if t is not None)


def _width(entry, a):
    """``d_in'`` of a layer's rows: its weight and bias columns as chosen."""
    _, mod, weight, bias = entry
    return (a.shape[-1] - (mod.bias is not None)) * (weight is not None) + (bias is not None)
