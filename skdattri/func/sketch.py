"""Cheap curvature inverses: a randomised Nystrom sketch and a diagonal.

Both follow the two-step protocol of :mod:`skdattri.func.ihvp` (``fit`` once,
``solve(B)`` for every block of query vectors ``B`` of shape ``(m, p)``):

* :class:`NystromIHVP`: ``fit`` multiplies the curvature with ``k`` random test
  vectors and keeps the eigenpairs of the rank-``k`` Nystrom approximation
  ``A_k = (A W)(W^T A W)^+ (A W)^T``; ``solve`` applies ``(A_k + damping I)^{-1}``
  in closed form (Woodbury), as pyDVL's ``NystroemSketchInfluence``.
* :class:`DiagonalIHVP`: ``fit`` stores the diagonal of the curvature (e.g. the mean
  squared per-sample gradient, :func:`gradient_square_mean`); ``solve`` divides by it,
  kronfluence's ``"diagonal"`` strategy.
"""

from __future__ import annotations

import math

import torch

from .._utils import _rows_per_block, _torch_generator
from ._ihvp_checks import _as_operator, _check_fitted, _check_int, _check_real, _drop_null_space
from .hessian import LinearOperator, _as_block

__all__ = ["NystromIHVP", "DiagonalIHVP", "gradient_square_mean", "nystrom"]

# test vectors multiplied with the curvature at once (memory: block x parameters)
_SKETCH_BLOCK = 256


def nystrom(A, n_components, *, random_state=None):
    """Eigenpairs of the rank-``k`` Nystrom approximation of a PSD operator.

    With ``W`` an orthonormalised ``(p, k)`` Gaussian test matrix and ``Y = A W``
    (``k`` curvature-vector products), the approximation is
    ``A_k = Y (W^T Y)^+ Y^T``, computed stably with a small shift ``nu``
    (Tropp et al., 2017; Frangella et al., 2023): ``Y_nu = Y + nu W``,
    ``C = chol(W^T Y_nu)``, ``B = Y_nu C^{-T}`` and the thin SVD ``B = U S V^T``
    give ``A_k = U diag(S^2 - nu) U^T``. With ``k = p`` the approximation is
    ``A`` itself.

    Parameters
    ----------
    A : LinearOperator or Tensor of shape (p, p)
        Symmetric positive semi-definite operator.
    n_components : int
        Sketch size ``k`` (at most ``p`` is used).
    random_state : int, RandomState instance, torch.Generator or None, default=None
        The test matrix.

    Returns
    -------
    eigenvalues : Tensor of shape (k,)
        Non-negative, descending.
    eigenvectors : Tensor of shape (k, p)
        Orthonormal, one per row.

    Raises
    ------
    ValueError
        When ``W^T A W`` is not positive semi-definite (an indefinite curvature).

    References
    ----------
    Tropp, Yurtsever, Udell and Cevher, "Fixed-rank approximation of a positive
    semidefinite matrix from streaming data", NeurIPS 2017. Frangella, Tropp and Udell,
    "Randomized Nystrom preconditioning", SIAM J. Matrix Anal. Appl. 2023.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.sketch import nystrom
    >>> H = torch.diag(torch.tensor([1.0, 5.0, 3.0], dtype=torch.float64))
    >>> values, vectors = nystrom(H, 3, random_state=0)
    >>> values.round(decimals=8)
    tensor([5., 3., 1.], dtype=torch.float64)
    """
    op = _as_operator(A)
    k = min(_check_int(n_components, "n_components"), op.p)
    gen = _torch_generator(random_state)
    W = torch.randn(op.p, k, generator=gen, dtype=torch.float64)
    W = torch.linalg.qr(W)[0].to(dtype=op.dtype, device=op.device)
    Y = torch.cat([op.matvec(block) for block in W.T.split(_SKETCH_BLOCK)]).T
    scale = float(torch.linalg.matrix_norm(Y, 2))
    if scale == 0.0:  # zero curvature: nothing to keep
        return Y.new_zeros(0), Y.new_zeros(0, op.p)
    nu = math.sqrt(op.p) * torch.finfo(op.dtype).eps * scale
    Y = Y + nu * W
    core = W.T @ Y
    factor, info = torch.linalg.cholesky_ex(0.5 * (core + core.T))
    if int(info) != 0:
        raise ValueError(
            "The Nystrom sketch needs a positive semi-definite curvature, but W^T H W is "
            "indefinite. Use the Gauss-Newton curvature (hessian='ggn') or the Fisher "
            "(hessian='fisher').")
    B = torch.linalg.solve_triangular(factor, Y.T, upper=False).T
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    return (S * S - nu).clamp_min(0.0), U.T.contiguous()


class NystromIHVP:
    """Inverse-HVP of a rank-``k`` Nystrom approximation of the curvature.

    ``fit`` computes the eigenpairs ``(lambda_i, u_i)`` of ``A_k`` with
    :func:`nystrom` (``k`` curvature-vector products, done as one block); ``solve``
    applies the exact inverse of ``A_k + damping I`` (Woodbury):
    ``X = sum_i u_i (u_i . b) / (lambda_i + damping) + (b - U^T U b) / damping``.
    The second term acts on the directions the sketch does not see; it needs
    ``damping > 0`` and is absent when ``k = p`` (then ``X`` is the exact inverse).
    With ``damping = 0`` it is dropped (the inverse on the sketch's span, as
    :class:`~skdattri.func.ihvp.ArnoldiIHVP`), together with zero eigenvalues.

    An operator with a known diagonal term (the model's L2 penalty, ``A.l2`` of a
    :class:`~skdattri.func.hessian.LinearOperator` over batches) keeps it exact: only the
    data term ``A - diag(l2)`` is sketched, and ``solve`` applies the inverse of
    ``A_k + D`` with ``D = diag(l2) + damping`` by the Woodbury identity with a diagonal,
    ``X = D^{-1} b - D^{-1} U^T (diag(1/lambda) + U D^{-1} U^T)^{-1} U D^{-1} b`` (when
    every entry of ``D`` is positive; otherwise the whole operator is sketched). The
    directions the sketch misses then get ``1 / (l2 + damping)``, not ``1 / damping``:
    on the digits logistic regression (rank 50 of 650, damping 1e-6) LDS 0.64 -> 0.73.

    Parameters
    ----------
    damping : float, default=0.0
    n_components : int, default=50
        Sketch size ``k``.
    random_state : int, RandomState instance, torch.Generator or None, default=None

    Attributes
    ----------
    eigenvalues_ : Tensor of shape (k,)
    eigenvectors_ : Tensor of shape (k, p)
        Orthonormal, one per row.
    damping_ : float
    complement_ : bool
        Whether ``solve`` adds the ``(b - U^T U b) / damping`` term.
    diagonal_ : Tensor of shape (p,) or None
        ``D = l2 + damping`` when the operator's diagonal term is kept exact (then the
        eigenpairs are those of the sketched data term), else ``None``.

    References
    ----------
    Hataya and Yamada, "Nystrom method for accurate and scalable implicit
    differentiation", AISTATS 2023. pyDVL's ``NystroemSketchInfluence``.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.sketch import NystromIHVP
    >>> H = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    >>> solver = NystromIHVP(damping=1.0, n_components=1, random_state=0).fit(H)
    >>> solver.eigenvalues_.shape
    torch.Size([1])
    >>> NystromIHVP(n_components=2, random_state=0).fit(H).solve(
    ...     torch.tensor([[2.0, 2.0]], dtype=torch.float64))
    tensor([[1.0000, 0.5000]], dtype=torch.float64)
    """

    def __init__(self, damping=0.0, n_components=50, random_state=None):
        self.damping = damping
        self.n_components = n_components
        self.random_state = random_state

    def fit(self, A):
        """Sketch ``A`` and keep the eigenpairs of its Nystrom approximation.

        Parameters
        ----------
        A : LinearOperator or Tensor of shape (p, p)

        Returns
        -------
        self : NystromIHVP
        """
        damping = _check_real(self.damping, "damping", low=0.0)
        op = _as_operator(A)
        self.damping_ = damping
        self._p = op.p
        self.diagonal_ = _known_diagonal(op, damping)
        if self.diagonal_ is not None:
            return self._fit_with_diagonal(op)
        values, vectors = nystrom(op, self.n_components, random_state=self.random_state)
        self.complement_ = damping > 0 and values.numel() < op.p
        if damping == 0:
            if values.numel() == 0:
                raise ValueError("The curvature is zero: the Nystrom inverse needs "
                                 "regularization > 0.")
            threshold = op.p * torch.finfo(values.dtype).eps * float(values.max())
            values, vectors = _drop_null_space(values, vectors, 0.0, threshold,
                                               "The Nystrom curvature")
        self.eigenvalues_, self.eigenvectors_ = values, vectors
        return self

    def _fit_with_diagonal(self, op):
        """Sketch ``A - diag(l2)`` and factor the Woodbury core of ``A_k + D``."""
        values, vectors = nystrom(_DataTerm(op), self.n_components,
                                  random_state=self.random_state)
        if values.numel():
            keep = values > op.p * torch.finfo(values.dtype).eps * float(values.max())
            values, vectors = values[keep], vectors[keep].contiguous()
        self.eigenvalues_, self.eigenvectors_ = values, vectors
        self.complement_ = False
        core = torch.diag(1.0 / values) + (vectors / self.diagonal_) @ vectors.T
        self._core = torch.linalg.cholesky(0.5 * (core + core.T)) if values.numel() else None
        return self

    def solve(self, B):
        """Apply ``(A_k + damping I)^{-1}`` to each row of ``B``.

        Parameters
        ----------
        B : Tensor of shape (m, p) or (p,)

        Returns
        -------
        X : Tensor of the shape of ``B``
        """
        _check_fitted(self, "damping_")
        U = self.eigenvectors_
        block, was_1d = _as_block(B, self._p, U.dtype, U.device)
        if getattr(self, "diagonal_", None) is not None:
            out = block / self.diagonal_
            if self._core is not None:
                t = torch.cholesky_solve((out @ U.T).T, self._core).T
                out.sub_((t @ U) / self.diagonal_)
            return out[0] if was_1d else out
        coef = block @ U.T
        out = (coef / (self.eigenvalues_ + self.damping_)) @ U
        if self.complement_:
            out = out + (block - coef @ U) / self.damping_
        return out[0] if was_1d else out


def _known_diagonal(op, damping):
    """``diag(l2) + damping`` of an operator with an L2 term and a product without it
    (``data_matvec``), when every entry is positive (the Woodbury identity with a
    diagonal needs its inverse), else ``None``."""
    l2 = getattr(op, "l2", None)
    if (l2 is None or (not isinstance(l2, torch.Tensor) and not l2)
            or not hasattr(op, "data_matvec")):
        return None
    D = (l2.to(op.dtype) if isinstance(l2, torch.Tensor)
         else torch.full((op.p,), float(l2), dtype=op.dtype)).to(op.device) + damping
    return D if bool((D > 0).all()) else None


class _DataTerm(LinearOperator):
    """``A - diag(l2)``: the data term of an operator with an L2 term, from its own
    product without it (no cancellation against a large ``l2``)."""

    def __init__(self, op):
        super().__init__(op.p, op.dtype, op.device)
        self.op = op

    def matvec(self, V):
        return self.op.data_matvec(V)


def gradient_square_mean(G, *, batch_size=None):
    """Mean of the squared rows of ``G``: the diagonal of the empirical Fisher.

    Parameters
    ----------
    G : Tensor or store of shape (n, p)
        Per-sample gradients, read in blocks of rows.
    batch_size : int, default=None
        Rows per block (``None``: as many as the working-memory budget holds).

    Returns
    -------
    diagonal : Tensor of shape (p,)

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.sketch import gradient_square_mean
    >>> gradient_square_mean(torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
    tensor([5., 2.])
    """
    if hasattr(G, "square_mean"):  # training gradients kept as layer factors
        return G.square_mean()
    n = G.shape[0]
    step = batch_size or _rows_per_block(G.shape[1])
    total = 0.0
    for start in range(0, n, step):
        rows = G[start:start + step]
        total = total + (rows * rows).sum(0)
    return total / n


class DiagonalIHVP:
    """Inverse of a diagonal curvature: ``x = b / (d + damping)`` coordinate-wise.

    Coordinates where ``d + damping`` is zero (a parameter no sample moves, without
    damping) get zero: the pseudo-inverse.

    Parameters
    ----------
    damping : float, default=0.0

    Attributes
    ----------
    diagonal_ : Tensor of shape (p,)
        The curvature's diagonal given to ``fit``.
    damping_ : float

    References
    ----------
    Grosse et al., "Studying large language model generalization with influence
    functions", 2023, and its library kronfluence (the ``"diagonal"`` strategy).

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.sketch import DiagonalIHVP
    >>> solver = DiagonalIHVP(damping=1.0).fit(torch.tensor([1.0, 3.0, 0.0]))
    >>> solver.solve(torch.tensor([[2.0, 4.0, 1.0]]))
    tensor([[1., 1., 1.]])
    """

    def __init__(self, damping=0.0):
        self.damping = damping

    def fit(self, diagonal):
        """Store the diagonal.

        Parameters
        ----------
        diagonal : Tensor of shape (p,)
            Non-negative.

        Returns
        -------
        self : DiagonalIHVP
        """
        damping = _check_real(self.damping, "damping", low=0.0)
        if not isinstance(diagonal, torch.Tensor) or diagonal.dim() != 1:
            raise ValueError("diagonal must be a 1-D tensor.")
        if bool((diagonal < 0).any()):
            raise ValueError("The diagonal curvature must be non-negative.")
        self.diagonal_, self.damping_ = diagonal, damping
        return self

    def solve(self, B, *, out=None):
        """Divide each row of ``B`` by the damped diagonal.

        Parameters
        ----------
        B : Tensor of shape (m, p) or (p,)
        out : Tensor of the shape of ``B``, default=None
            Where to write the result (``B`` itself is allowed).

        Returns
        -------
        X : Tensor of the shape of ``B``
        """
        _check_fitted(self, "damping_")
        d = self.diagonal_ + self.damping_
        block, was_1d = _as_block(B, d.shape[0], d.dtype, d.device)
        inverse = torch.where(d > 0, 1.0 / d.clamp_min(torch.finfo(d.dtype).tiny),
                              torch.zeros_like(d))
        if out is not None and out.shape == block.shape and out.dtype == block.dtype:
            return torch.mul(block, inverse, out=out)
        out = block * inverse
        return out[0] if was_1d else out
