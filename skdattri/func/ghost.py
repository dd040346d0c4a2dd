"""Ghost inner products: gradient inner products from layer factors, no gradient formed.

For a hooked layer (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``; see
:mod:`skdattri.func.hooks`) the per-sample gradient of the weight is
``G_i = sum_t g_it a_it^T`` (inputs ``a`` of shape ``(T, d_in)``, output gradients
``g`` of shape ``(T, d_out)``), so that

``<G_i, G_j> = sum_{s,t} (a_is . a_jt) (g_is . g_jt)``

-- with one position ``(a_i . a_j)(g_i . g_j)`` -- and the bias, whose gradient is
``sum_t g_it``, adds ``sum_{s,t} (g_is . g_jt)`` (a column of ones in ``a``). A sample is
then described by its *factor row*: for every "ghost" layer its ``a`` and ``g``
flattened, followed by the explicit gradient columns of everything else -- the layers
where ghost products do not pay (materialised from the hooks) and the parameters of
other modules (embeddings from their hooks; norm layers and custom modules by
``vmap(grad)`` of those parameters only).

**When a layer is ghost** (``ghost="auto"``): scoring one pair costs
``T^2 (d_in + d_out)`` with factors against ``d_in * d_out`` with the gradient, and a
factor row stores ``T (d_in + d_out)`` numbers against ``d_in * d_out``; a layer is
ghost when ``T^2 (d_in + d_out) < d_in * d_out`` (which implies the smaller storage).
Wide single-position layers (an MLP's) are ghost; convolutions with many output
positions and small kernels are materialised.
"""

from __future__ import annotations

import torch

from .._utils import BLOCK_ELEMENTS, _take_rows
from ._grad import _hook_layers

__all__ = ["GhostFeatures", "GhostLayout", "ghost_gram", "ghost_layout", "ghost_row_dot",
           "ghost_scale", "ghost_sq_norms", "layer_gram"]


class GhostLayout:
    """Column layout of factor rows (plain Python: picklable, no tensors).

    Built by :func:`ghost_layout`. A factor row is ``[a of every ghost layer | g of
    every ghost layer | explicit gradient columns]``: columns ``[:a_width]`` are the
    layer inputs, and scaling the gradient a row stands for (a learning rate, a
    normalisation) scales columns ``[a_width:]`` only.

    Parameters
    ----------
    ghost : list of (str, str, str or None, int, int, int)
        ``(layer, weight, bias, T, d_in, d_out)`` of the ghost layers.
    dense : list of (str, str or None, str or None)
        ``(layer, weight, bias)`` of the hooked layers to materialise.
    rest : list of str
        The other parameters.
    sizes : dict of str to int
        Number of entries of every parameter the gradient covers.

    Attributes
    ----------
    ghost : list of tuple
        ``(layer, weight, bias, T, d_in, d_out, a_offset, g_offset)`` of every ghost
        layer (``bias`` is the bias parameter's name or ``None``).
    dense : list of tuple
        ``(layer, weight, bias, offset)`` of the hooked layers materialised from their
        factors (``weight`` or ``bias`` may be ``None``).
    rest : list of str
        The other parameters (embeddings from their hooks, the rest by ``vmap(grad)``),
        their gradients in the columns from ``rest_offset``.
    a_width, explicit_offset, width, n_grad : int
        Width of the input part, first column of the explicit gradients, width of the
        row, and size of the gradient it stands for.
    """

    def __init__(self, ghost, dense, rest, sizes):
        self.a_width = sum(T * d_in for _, _, _, T, d_in, _ in ghost)
        self.ghost, pos, g_pos = [], 0, self.a_width
        for layer, weight, bias, T, d_in, d_out in ghost:
            self.ghost.append((layer, weight, bias, T, d_in, d_out, pos, g_pos))
            pos, g_pos = pos + T * d_in, g_pos + T * d_out
        self.explicit_offset, self.dense = g_pos, []
        for layer, weight, bias in dense:
            self.dense.append((layer, weight, bias, g_pos))
            g_pos += sum(sizes[n] for n in (weight, bias) if n)
        self.rest, self.rest_offset = list(rest), g_pos
        self.width = g_pos + sum(sizes[n] for n in self.rest)
        self.n_grad = sum(sizes.values())

    def __repr__(self):
        return (f"GhostLayout(ghost={[g[0] for g in self.ghost]}, "
                f"dense={[d[0] for d in self.dense]}, rest={self.rest}, width={self.width}, "
                f"n_grad={self.n_grad})")


def ghost_layout(model, params, names, X, *, ghost="auto"):
    """Decide which layers are ghost and lay out the factor rows.

    Parameters
    ----------
    model : TorchModel
    params : dict of str to Tensor
        Parameters at which the model is evaluated.
    names : list of str
        The parameters the gradient covers.
    X : Tensor or dict of Tensor
        A batch of inputs; its first rows are run once to read every layer's positions
        ``T`` and factor sizes.
    ghost : {"auto", True}, default="auto"
        ``"auto"``: a layer is ghost when ``T^2 (d_in + d_out) < d_in * d_out`` (see
        the module docstring); ``True``: every hooked layer whose weight is in
        ``names``.

    Returns
    -------
    layout : GhostLayout
    """
    from .hooks import LayerCapture

    names = list(names)
    layers = _hook_layers(model, names)
    shapes = {}
    if layers:
        with torch.no_grad(), LayerCapture([(k, m) for k, (m, _, _) in layers.items()],
                                           bias_column=False) as capture:
            model.forward(params, _take_rows(X, slice(0, 2)))
            a, z = capture.inputs(), capture.outputs()
        shapes = {k: (a[k].shape[1], a[k].shape[2], z[k].shape[2]) for k in layers}
    ghost_layers, dense = [], []
    for layer, (_, weight, bias) in layers.items():
        T, d_in, d_out = shapes[layer]
        cheaper = T * T * (d_in + d_out) < d_in * d_out
        if weight is not None and (ghost is True or cheaper):
            ghost_layers.append((layer, weight, bias, T, d_in, d_out))
        else:
            dense.append((layer, weight, bias))
    hooked = {n for _, w, b in layers.values() for n in (w, b) if n}
    rest = [n for n in names if n not in hooked]
    return GhostLayout(ghost_layers, dense, rest, {n: params[n].numel() for n in names})


def _configured_layout(model, params, names, X):
    """:func:`ghost_layout` as :func:`skdattri.set_config` says (``ghost=``): ``None``
    when ghost layouts are off (``False``) or, for ``"auto"``, when the gradient engine
    is ``vmap`` or the factor rows would not be narrower than the gradients."""
    from .._config import get_config

    config = get_config()
    if config["ghost"] is False or (config["ghost"] == "auto"
                                    and config["grad_engine"] == "vmap"):
        return None
    layout = ghost_layout(model, params, names, X, ghost=config["ghost"])
    if config["ghost"] == "auto" and (not layout.ghost or layout.width >= layout.n_grad):
        return None
    return layout


def _factor_rows(model, params, X, y, what, layout, out):
    from ._grad import _capture_pass, _embedding_layers, _vmap_grads
    from .hooks import per_sample_layer_grads

    n = y.shape[0]
    mods = dict(model.module.named_modules())
    hooked = [e[0] for e in layout.ghost] + [e[0] for e in layout.dense]
    offsets, off = {}, layout.rest_offset
    for k in layout.rest:
        offsets[k], off = off, off + params[k].numel()
    embeddings = _embedding_layers(model, layout.rest)  # from the same pass as the layers
    done = set()
    if hooked or embeddings:
        wanted = {n_ for e in layout.ghost + layout.dense for n_ in e[1:3] if n_}
        wanted |= {w for _, w in embeddings.values()}
        stats, done = _capture_pass(model, params, X, y, what, wanted,
                                    [(k, mods[k]) for k in hooked], embeddings, out, offsets)
        for layer, _, _, T, d_in, d_out, a_off, g_off in layout.ghost:
            a, g = stats[layer]
            out[:, a_off:a_off + T * d_in] = a.reshape(n, -1)
            out[:, g_off:g_off + T * d_out] = g.reshape(n, -1)
        for layer, weight, bias, off in layout.dense:
            a, g = stats[layer]
            if weight is not None:
                size = a.shape[2] * g.shape[2]
                out[:, off:off + size] = per_sample_layer_grads(a, g).reshape(n, -1)
                off += size
            if bias is not None:
                out[:, off:off + g.shape[2]] = g.sum(1)
    rest = [k for k in layout.rest if k not in done]
    if rest:  # norm layers, tied weights, embeddings called without a batch: vmap(grad)
        G, start = _vmap_grads(model, params, X, y, what, rest), 0
        for k in rest:
            size = params[k].numel()
            out[:, offsets[k]:offsets[k] + size] = G[:, start:start + size]
            start += size
    return out


class GhostFeatures:
    """``(params, X, y, what, out=None) -> (n, width)`` factor rows of a batch.

    One batched forward and backward pass with layer hooks gives ``a`` and ``g`` of
    every hooked layer; ghost layers store them, materialised layers store
    ``sum_t g_t a_t^T`` (and ``sum_t g_t`` for the bias), and the other parameters get
    ``vmap(grad)`` columns. The feature-map protocol of
    :meth:`skdattri.base.BaseAttributor._feature_map`.

    Parameters
    ----------
    model : TorchModel
    layout : GhostLayout
    """

    requires_fit = False

    def __init__(self, model, layout):
        self.model, self.layout = model, layout

    def width(self, params=None):
        return self.layout.width

    def __call__(self, params, X, y, what, out=None):
        if out is None:
            ref = next(iter(params.values()))
            out = torch.empty((y.shape[0], self.layout.width), dtype=ref.dtype,
                              device=ref.device)
        return _factor_rows(self.model, params, X, y, what, self.layout, out)


def layer_gram(a_q, g_q, a_t, g_t, *, bias=False):
    """``<G_i, G_j>`` of one layer for every query ``i`` and train sample ``j``.

    Parameters
    ----------
    a_q : Tensor of shape (m, T, d_in)
    g_q : Tensor of shape (m, T, d_out)
    a_t : Tensor of shape (n, T, d_in)
    g_t : Tensor of shape (n, T, d_out)
    bias : bool, default=False
        Include the bias gradient ``sum_t g_t`` (as a column of ones in ``a``).

    Returns
    -------
    gram : Tensor of shape (m, n)
        ``sum_{s,t} (a_is . a_jt + bias) (g_is . g_jt)``, in blocks of train rows so
        that the ``(m, T, n, T)`` temporaries stay within
        :data:`~skdattri._utils.BLOCK_ELEMENTS`.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.ghost import layer_gram
    >>> a, g = torch.randn(3, 1, 4, dtype=torch.float64), torch.randn(3, 1, 2, dtype=torch.float64)
    >>> G = (g[:, 0, :, None] * a[:, 0, None, :]).reshape(3, -1)  # explicit gradients
    >>> bool(torch.allclose(layer_gram(a, g, a, g), G @ G.T))
    True
    """
    m, T, _ = a_q.shape
    n = a_t.shape[0]
    if T == 1:
        A = a_q[:, 0] @ a_t[:, 0].T
        return (A.add_(1) if bias else A).mul_(g_q[:, 0] @ g_t[:, 0].T)
    out = a_q.new_empty((m, n))
    step = max(1, BLOCK_ELEMENTS // max(1, m * T * T))
    aq, gq = a_q.reshape(m * T, -1), g_q.reshape(m * T, -1)
    for s in range(0, n, step):
        e = min(s + step, n)
        A = (aq @ a_t[s:e].reshape((e - s) * T, -1).T).view(m, T, e - s, T)
        if bias:
            A += 1
        A.mul_((gq @ g_t[s:e].reshape((e - s) * T, -1).T).view(m, T, e - s, T))
        out[:, s:e] = A.sum((1, 3))
    return out


def _factors(F, entry):
    _, _, _, T, d_in, d_out, a_off, g_off = entry
    n = F.shape[0]
    return (F[:, a_off:a_off + T * d_in].reshape(n, T, d_in),
            F[:, g_off:g_off + T * d_out].reshape(n, T, d_out))


def ghost_gram(Q, G, layout):
    """Gradient inner products ``(m, n)`` of query and train factor rows.

    Parameters
    ----------
    Q : Tensor of shape (m, width)
        Query factor rows (:class:`GhostFeatures`).
    G : Tensor of shape (n, width)
        Train factor rows.
    layout : GhostLayout

    Returns
    -------
    gram : Tensor of shape (m, n)
        Equals ``grad_q @ grad_t.T`` of the gradients the rows stand for.
    """
    e = layout.explicit_offset
    # no (m, n) product of zero-width explicit parts to allocate, zero and add to
    out = Q[:, e:] @ G[:, e:].T if layout.width > e or not layout.ghost else None
    for entry in layout.ghost:
        part = layer_gram(*_factors(Q, entry), *_factors(G, entry), bias=entry[2] is not None)
        out = part if out is None else out.add_(part)
    return out


def ghost_row_dot(P, Q, layout):
    """Paired gradient inner products ``<grad(P_i), grad(Q_i)>`` of factor rows, ``(n,)``.

    Parameters
    ----------
    P, Q : Tensor of shape (n, width)
    layout : GhostLayout

    Returns
    -------
    values : Tensor of shape (n,)
    """
    e = layout.explicit_offset
    out = (P[:, e:] * Q[:, e:]).sum(1)
    for entry in layout.ghost:
        (ap, gp), (aq, gq) = _factors(P, entry), _factors(Q, entry)
        A = torch.einsum("nsi,nti->nst", ap, aq)
        if entry[2] is not None:
            A += 1
        out += A.mul_(torch.einsum("nso,nto->nst", gp, gq)).sum((1, 2))
    return out


def ghost_sq_norms(F, layout):
    """Squared norms ``||grad(F_i)||^2`` of the gradients factor rows stand for, ``(n,)``.

    Parameters
    ----------
    F : Tensor of shape (n, width)
    layout : GhostLayout

    Returns
    -------
    values : Tensor of shape (n,)
    """
    return ghost_row_dot(F, F, layout)


def ghost_scale(F, scale, layout, *, inplace=False):
    """Factor rows of ``scale * grad(F_i)``: the columns after the inputs, times ``scale``.

    Parameters
    ----------
    F : Tensor of shape (n, width)
    scale : float or Tensor of shape (n, 1)
    layout : GhostLayout
    inplace : bool, default=False

    Returns
    -------
    F : Tensor of shape (n, width)
    """
    F = F if inplace else F.clone()
    F[:, layout.a_width:] *= scale
    return F
