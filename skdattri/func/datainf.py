"""DataInf: closed-form layer-wise inverse-HVP from per-sample gradients.

DataInf (Kwon et al., 2024) approximates, for each layer ``l``, the inverse of
the damped empirical Fisher ``(1/n) sum_j g_jl g_jl^T + lambda_l I`` by the
average of the per-sample inverses, each of which has a Sherman-Morrison closed
form::

    (1/n) sum_j (g_jl g_jl^T + lambda_l I)^{-1} v
        = (1/lambda_l) (v - (1/n) sum_j [(v . g_jl) / (lambda_l + ||g_jl||^2)] g_jl).

Only inner products of the queries with the training gradients are needed: the
cost is that of one ``(m, p) x (p, n)`` product and memory is bounded by the
chunk of training rows processed at a time.
"""

from __future__ import annotations

import numbers

import torch

from .._utils import _rows_per_block
from ._ihvp_checks import _check_fitted

__all__ = ["DataInfIHVP", "datainf_ihvp", "datainf_damping"]


def _layer_slices(layer_sizes, p):
    """Normalise ``layer_sizes`` (None, sizes, or (start, stop) pairs) to slices tiling p."""
    if layer_sizes is None:
        return [(0, p)]
    items = list(layer_sizes)
    if not items:
        raise ValueError("layer_sizes must not be empty.")
    if all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in items):
        if any(s <= 0 for s in items):
            raise ValueError(f"layer_sizes must be positive, got {items}.")
        slices, start = [], 0
        for size in items:
            slices.append((start, start + int(size)))
            start += int(size)
    else:
        try:
            slices = [(int(a), int(b)) for a, b in items]
        except (TypeError, ValueError):
            raise TypeError(
                "layer_sizes must be a list of layer sizes or of (start, stop) pairs."
            ) from None
    ordered = sorted(slices)
    cursor = 0
    for start, stop in ordered:
        if start != cursor or stop <= start:
            raise ValueError(
                f"The layers must tile the p={p} coordinates without gap or overlap, got "
                f"{slices}."
            )
        cursor = stop
    if cursor != p:
        raise ValueError(f"The layers cover {cursor} coordinates, but the gradients have p={p}.")
    return slices


def _check_inputs(G_train, p=None):
    """``G_train``: a 2-D tensor, or a store of rows (sliced block by block)."""
    if not hasattr(G_train, "shape") or len(G_train.shape) != 2:
        raise ValueError("G_train must be a 2-D tensor of per-sample gradients (n, p).")
    if G_train.shape[0] == 0:
        raise ValueError("G_train has no rows.")
    if p is not None and G_train.shape[1] != p:
        raise ValueError(f"G_train has p={G_train.shape[1]} columns, the queries have {p}.")


def _squared_norms(G_train, slices, chunk_size, device, dtype):
    """``(n, L)`` squared norms of every sample's gradient per layer."""
    n = G_train.shape[0]
    rows = []
    for start in range(0, n, chunk_size):
        chunk = G_train[start : start + chunk_size].to(device=device, dtype=dtype)
        rows.append(torch.stack([(chunk[:, a:b] ** 2).sum(1) for a, b in slices], dim=1))
    return torch.cat(rows)


def _resolve_damping(damping, sq_norms, slices):
    n_layers = len(slices)
    if damping is None:
        sizes = torch.tensor([b - a for a, b in slices], dtype=sq_norms.dtype,
                             device=sq_norms.device)
        return 0.1 * sq_norms.mean(0) / sizes
    if isinstance(damping, numbers.Real) and not isinstance(damping, bool):
        values = [float(damping)] * n_layers
    else:
        values = [float(d) for d in damping]
        if len(values) != n_layers:
            raise ValueError(f"damping has {len(values)} values for {n_layers} layers.")
    out = torch.tensor(values, dtype=sq_norms.dtype, device=sq_norms.device)
    if bool((out <= 0).any()):
        raise ValueError(f"DataInf needs a positive damping per layer, got {values}.")
    return out


def datainf_damping(G_train, layer_sizes=None, *, chunk_size=None):
    """Default DataInf damping per layer: ``0.1 * mean_j ||g_jl||^2 / d_l``.

    The heuristic of Kwon et al. (2024), ``lambda_l = 0.1 (n d_l)^{-1}
    sum_j ||g_jl||^2``: a tenth of the mean squared gradient coordinate of the layer.

    Parameters
    ----------
    G_train : Tensor of shape (n, p)
        Per-sample training gradients.
    layer_sizes : list of int, list of (start, stop), or None, default=None
        Layer blocks tiling the ``p`` coordinates (``None``: one layer).
    chunk_size : int, default=None
        Training rows per chunk.

    Returns
    -------
    damping : Tensor of shape (n_layers,)

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.datainf import datainf_damping
    >>> G = torch.tensor([[1.0, 1.0, 2.0], [3.0, 1.0, 0.0]])
    >>> datainf_damping(G, [2, 1])
    tensor([0.3000, 0.2000])
    """
    return DataInfIHVP(layer_sizes=layer_sizes, chunk_size=chunk_size).fit(G_train).damping_


def datainf_ihvp(G_train, V, layer_sizes=None, damping=None, *, chunk_size=None,
                 return_damping=False):
    """DataInf inverse-HVP of query vectors, layer by layer.

    For each layer ``l`` (a block of coordinates) and each query row ``v``::

        x_l = (1/lambda_l) (v_l - (1/n) sum_j c_jl g_jl),
        c_jl = (v_l . g_jl) / (lambda_l + ||g_jl||^2).

    No ``(n, p, m)`` tensor and no ``n x n`` matrix is formed: training rows are
    processed in chunks, and memory is ``O(m * chunk_size + m * p)``.

    Parameters
    ----------
    G_train : Tensor of shape (n, p)
        Per-sample training gradients (may live on another device than ``V``; chunks
        are moved to ``V``'s device).
    V : Tensor of shape (m, p) or (p,)
        Query vectors (e.g. test gradients), one per row.
    layer_sizes : list of int, list of (start, stop), or None, default=None
        Layer blocks tiling the ``p`` coordinates, as sizes in order or as
        ``(start, stop)`` pairs. ``None``: a single block (the whole model).
    damping : float, sequence of float, or None, default=None
        ``lambda_l``: one value for every layer, one per layer, or ``None`` for the
        paper's heuristic (:func:`datainf_damping`).
    chunk_size : int, default=None
        Training rows per chunk (default: about ``2**24 / max(m, p)``).
    return_damping : bool, default=False
        Also return the per-layer damping used.

    Returns
    -------
    X : Tensor of the shape of ``V``
        The DataInf inverse-HVP of each query; scores are ``X @ G_train.T``.
    damping : Tensor of shape (n_layers,)
        Only if ``return_damping``.

    Notes
    -----
    With one training sample the result is exactly ``(g g^T + lambda I)^{-1} v``
    per layer; in general it is the average of these per-sample inverses, which
    approximates the inverse of the average (Kwon et al., 2024, Sec. 3).

    References
    ----------
    Kwon, Wu, Wu and Zou, "DataInf: Efficiently estimating data influence in
    LoRA-tuned LLMs and diffusion models", ICLR 2024.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.datainf import datainf_ihvp
    >>> g = torch.tensor([[1.0, 2.0]], dtype=torch.float64)       # one training sample
    >>> v = torch.tensor([[3.0, -1.0]], dtype=torch.float64)
    >>> datainf_ihvp(g, v, damping=0.5)
    tensor([[ 5.6364, -2.7273]], dtype=torch.float64)
    >>> torch.linalg.solve(g.T @ g + 0.5 * torch.eye(2, dtype=torch.float64), v[0])
    tensor([ 5.6364, -2.7273], dtype=torch.float64)
    """
    solver = DataInfIHVP(damping=damping, layer_sizes=layer_sizes, chunk_size=chunk_size)
    out = solver.fit(G_train).solve(V)
    return (out, solver.damping_) if return_damping else out


class DataInfIHVP:
    """DataInf as a fitted solver: train-side work in ``fit``, queries in ``solve``.

    ``fit`` keeps the training gradients (a reference, no copy), the layer blocks, the
    per-layer squared norms of every training gradient and the damping; ``solve``
    returns :func:`datainf_ihvp` of a block of query vectors without recomputing any of
    them, and changes nothing in the solver.

    Parameters
    ----------
    damping : float, sequence of float, or None, default=None
        As in :func:`datainf_ihvp` (``None``: :func:`datainf_damping`).
    layer_sizes : list of int, list of (start, stop), or None, default=None
        Layer blocks tiling the coordinates.
    chunk_size : int, default=None
        Training rows per chunk of ``solve``.

    Attributes
    ----------
    G_train_ : Tensor of shape (n, p)
    squared_norms_ : Tensor of shape (n, n_layers)
    damping_ : Tensor of shape (n_layers,)

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.datainf import DataInfIHVP
    >>> g = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    >>> DataInfIHVP(damping=0.5).fit(g).solve(torch.tensor([[3.0, -1.0]], dtype=torch.float64))
    tensor([[ 5.6364, -2.7273]], dtype=torch.float64)
    """

    def __init__(self, damping=None, layer_sizes=None, chunk_size=None):
        self.damping = damping
        self.layer_sizes = layer_sizes
        self.chunk_size = chunk_size

    def fit(self, G_train):
        """Compute the squared norms and the damping of the training gradients.

        Parameters
        ----------
        G_train : Tensor of shape (n, p)

        Returns
        -------
        self : DataInfIHVP
        """
        _check_inputs(G_train)
        chunk = self.chunk_size
        if chunk is not None and (not isinstance(chunk, numbers.Integral) or chunk < 1):
            raise ValueError(f"chunk_size must be a positive integer, got {chunk!r}.")
        p = G_train.shape[1]
        self.slices_ = _layer_slices(self.layer_sizes, p)
        rows = chunk or _rows_per_block(p)
        dtype = G_train.dtype if G_train.dtype.is_floating_point else torch.float32
        self.squared_norms_ = _squared_norms(G_train, self.slices_, rows, G_train.device, dtype)
        self.damping_ = _resolve_damping(self.damping, self.squared_norms_, self.slices_)
        self.G_train_ = G_train
        return self

    def solve(self, V):
        """The DataInf inverse-HVP of each row of ``V`` (shape ``(m, p)`` or ``(p,)``)."""
        _check_fitted(self, "G_train_")
        if not isinstance(V, torch.Tensor):
            raise TypeError(f"V must be a torch.Tensor, got {type(V).__name__}.")
        G_train = self.G_train_
        single = V.dim() == 1
        block = V.unsqueeze(0) if single else V
        if block.dim() != 2:
            raise ValueError(f"V must have shape (m, p) or (p,), got {tuple(V.shape)}.")
        _check_inputs(G_train, block.shape[1])
        if not block.is_floating_point():
            block = block.to(self.squared_norms_.dtype)
        n, p = G_train.shape
        device, dtype = block.device, block.dtype
        chunk = self.chunk_size or _rows_per_block(max(block.shape[0], p))
        sq_norms = self.squared_norms_.to(device=device, dtype=dtype)
        lam = self.damping_.to(device=device, dtype=dtype)
        correction = torch.zeros_like(block)
        for start in range(0, n, chunk):
            g = G_train[start : start + chunk].to(device=device, dtype=dtype)
            denom = lam[None, :] + sq_norms[start : start + chunk]  # (c, L)
            for k, (a, b) in enumerate(self.slices_):
                coef = (block[:, a:b] @ g[:, a:b].T) / denom[:, k]  # (m, c)
                correction[:, a:b] += coef @ g[:, a:b]
        out = torch.empty_like(block)
        for k, (a, b) in enumerate(self.slices_):
            out[:, a:b] = (block[:, a:b] - correction[:, a:b] / n) / lam[k]
        return out[0] if single else out
