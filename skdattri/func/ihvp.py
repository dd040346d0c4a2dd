"""Inverse Hessian-vector product (IHVP) solvers.

Each solver solves ``(A + damping * I) X^T = B^T`` for a block ``B`` of shape
``(m, p)`` (one right-hand side per row, see :mod:`skdattri.func.hessian`), where
``A`` is any :class:`~skdattri.func.hessian.LinearOperator` (or a dense symmetric
``(p, p)`` tensor). Work is split in two, as an influence estimator needs it:

* ``fit(A)``: curvature work done once (a factorisation, an eigendecomposition,
  or nothing but storing the operator);
* ``solve(B)``: applied to every block of query vectors.

* :class:`ExplicitIHVP`: ``fit`` materialises ``A`` and computes ``eigh``;
  ``solve`` is two matrix products.
* :class:`ConjugateGradientIHVP`: ``fit`` stores ``A``; ``solve`` runs block CG.
* :class:`LissaIHVP`: ``fit`` stores ``A`` and lists its batches; ``solve`` runs
  the stochastic recursion.
* :class:`ArnoldiIHVP`: ``fit`` finds the top eigenpairs (:func:`arnoldi`);
  ``solve`` is two matrix products.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from sklearn.exceptions import ConvergenceWarning, NotFittedError

from .._utils import _torch_generator
from .hessian import DenseOperator, LinearOperator, _as_block

__all__ = [
    "ExplicitIHVP",
    "ConjugateGradientIHVP",
    "LissaIHVP",
    "ArnoldiIHVP",
    "arnoldi",
    "eigen_ihvp",
]


# --------------------------------------------------------------------------- helpers


def _as_operator(A):
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, torch.Tensor) and A.dim() == 2:
        return DenseOperator(A)
    raise TypeError(
        "The curvature must be a skdattri.func.LinearOperator or a dense (p, p) tensor, "
        f"got {type(A).__name__}."
    )


def _check_real(value, name, *, low=None, strict=False):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value):
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    if low is not None and (value < low or (strict and value == low)):
        sign = ">" if strict else ">="
        raise ValueError(f"{name} must be {sign} {low}, got {value!r}.")
    return float(value)


def _check_int(value, name, *, low=1):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}.")
    return int(value)


def _check_fitted(solver, attribute):
    if not hasattr(solver, attribute):
        raise NotFittedError(
            f"This {type(solver).__name__} instance is not fitted yet. Call 'fit' with the "
            "curvature operator before 'solve'."
        )


def _not_pd_message(smallest, damping, what):
    return (
        f"{what} + damping * I is not positive definite: its smallest eigenvalue is "
        f"{smallest:.3g} with damping={damping:.3g}. Increase the damping (regularization), "
        "or use the Gauss-Newton curvature (hessian='ggn'), which is positive semi-definite."
    )


def _drop_null_space(eigenvalues, eigenvectors, damping, threshold, what):
    """Keep eigenpairs with ``eigenvalue + damping > threshold``; raise if indefinite.

    Eigenvalues within ``threshold`` of zero (after damping) are the curvature's
    numerical null space -- e.g. the shift invariance of a softmax with unpenalised
    intercepts -- and are dropped, which makes the solve a pseudo-inverse: exact for
    vectors orthogonal to the null space, as every per-sample gradient of such a model
    is. A clearly negative eigenvalue means the curvature is indefinite: ValueError.

    ``eigenvectors`` holds one eigenvector per row.
    """
    shifted = eigenvalues + damping
    smallest = float(eigenvalues.min()) if eigenvalues.numel() else 0.0
    if bool((shifted < -threshold).any()):
        raise ValueError(_not_pd_message(smallest, damping, what))
    keep = shifted > threshold
    if not bool(keep.any()):
        raise ValueError(_not_pd_message(smallest, damping, what))
    return eigenvalues[keep], eigenvectors[keep].contiguous()


def eigen_ihvp(eigenvalues, eigenvectors, B, damping=0.0):
    """Inverse of ``U^T diag(eigenvalues) U + damping * I`` restricted to ``span(U)``.

    Computes ``X = ((B U^T) / (eigenvalues + damping)) U``, i.e. for each row ``b``
    of ``B`` the vector ``sum_i u_i (u_i . b) / (lambda_i + damping)``. With a full
    orthonormal eigenbasis this is the exact inverse; with the top ``k``
    eigenpairs it drops the complement of their span (as in Schioppa et al., 2022).

    Parameters
    ----------
    eigenvalues : Tensor of shape (k,)
    eigenvectors : Tensor of shape (k, p)
        Orthonormal eigenvectors, one per row.
    B : Tensor of shape (m, p) or (p,)
    damping : float, default=0.0

    Returns
    -------
    X : Tensor of the shape of ``B``

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.ihvp import eigen_ihvp
    >>> eigen_ihvp(torch.tensor([1.0, 3.0]), torch.eye(2), torch.tensor([[2.0, 2.0]]), 1.0)
    tensor([[1.0000, 0.5000]])
    """
    block, was_1d = _as_block(B, eigenvectors.shape[1], eigenvectors.dtype, eigenvectors.device)
    out = ((block @ eigenvectors.T) / (eigenvalues + damping)) @ eigenvectors
    return out[0] if was_1d else out


# --------------------------------------------------------------------------- explicit


class ExplicitIHVP:
    """Exact inverse-HVP from an eigendecomposition of the dense curvature.

    ``fit`` materialises ``A`` as a ``(p, p)`` matrix (for a
    :class:`~skdattri.func.hessian.HessianOperator` with
    :func:`~skdattri.func.hessian.hessian`), and computes its eigendecomposition
    once; ``solve`` costs two ``(m, p) x (p, p)`` products.

    Parameters
    ----------
    damping : float, default=0.0
        ``lambda`` in ``(A + lambda I)^{-1}``.
    max_params : int, default=10_000
        Largest ``p`` accepted (the dense matrix holds ``p**2`` floats: 800 MB in
        float64 at the default).

    Attributes
    ----------
    eigenvalues_ : Tensor of shape (p,)
        Eigenvalues of ``A`` (without damping), ascending.
    eigenvectors_ : Tensor of shape (p, p)
        Orthonormal eigenvectors, one per row.
    damping_ : float
        The validated damping used by ``solve``.

    Raises
    ------
    ValueError
        In ``fit``, when ``p > max_params`` or when ``A + damping I`` is not
        positive definite.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.ihvp import ExplicitIHVP
    >>> H = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    >>> ExplicitIHVP(damping=0.0).fit(H).solve(torch.tensor([[2.0, 2.0]], dtype=torch.float64))
    tensor([[1.0000, 0.5000]], dtype=torch.float64)
    """

    def __init__(self, damping=0.0, max_params=10_000):
        self.damping = damping
        self.max_params = max_params

    def fit(self, A):
        """Materialise and eigendecompose ``A``.

        Parameters
        ----------
        A : LinearOperator or Tensor of shape (p, p)

        Returns
        -------
        self : ExplicitIHVP
        """
        damping = _check_real(self.damping, "damping", low=0.0)
        max_params = _check_int(self.max_params, "max_params")
        op = _as_operator(A)
        if op.p > max_params:
            gib = op.p**2 * torch.finfo(op.dtype).bits / 8 / 2**30
            raise ValueError(
                f"The explicit solver needs a dense {op.p} x {op.p} curvature matrix "
                f"({gib:.1f} GiB), above max_params={max_params}. Use the 'cg', 'arnoldi' "
                "or 'ekfac' solver, restrict the parameters (layers=), or raise max_params."
            )
        dense = op.to_dense()
        dense = 0.5 * (dense + dense.T)
        eigenvalues, eigenvectors = torch.linalg.eigh(dense)
        scale = float(eigenvalues.abs().max()) if eigenvalues.numel() else 0.0
        threshold = op.p * torch.finfo(eigenvalues.dtype).eps * max(scale, damping)
        self.eigenvalues_, self.eigenvectors_ = _drop_null_space(
            eigenvalues, eigenvectors.T, damping, threshold, "The curvature")
        self.damping_ = damping
        return self

    def solve(self, B):
        """Return ``(A + damping I)^{-1} b`` for each row ``b`` of ``B``.

        Parameters
        ----------
        B : Tensor of shape (m, p) or (p,)

        Returns
        -------
        X : Tensor of the shape of ``B``
        """
        _check_fitted(self, "eigenvalues_")
        return eigen_ihvp(self.eigenvalues_, self.eigenvectors_, B, self.damping_)


# --------------------------------------------------------------------------- conjugate gradient


class ConjugateGradientIHVP:
    """Block conjugate gradient for ``(A + damping I) X^T = B^T``.

    One conjugate-gradient recursion per row of ``B``, run in lockstep with
    per-row step sizes: every iteration costs one *batched* product of ``A``
    with the still-unconverged rows (for a
    :class:`~skdattri.func.hessian.HessianOperator`, one pass over the training
    data for all queries together). A row stops when its relative residual
    ``||b - (A + damping I) x|| / ||b||`` is at most ``tol``.

    Parameters
    ----------
    damping : float, default=0.0
    tol : float, default=1e-6
        Relative residual at which a row is converged.
    max_iter : int, default=100
        Iterations at most; :class:`~sklearn.exceptions.ConvergenceWarning` if some
        row has not converged by then.

    Attributes
    ----------
    operator_ : LinearOperator
        The curvature given to ``fit``. ``solve`` changes no attribute: its
        iteration count and residuals come back with ``return_info=True``.

    Raises
    ------
    ValueError
        In ``solve``, when a search direction has non-positive curvature
        (``A + damping I`` is not positive definite).

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.ihvp import ConjugateGradientIHVP
    >>> H = torch.tensor([[2.0, 1.0], [1.0, 4.0]], dtype=torch.float64)
    >>> cg = ConjugateGradientIHVP(tol=1e-12).fit(H)
    >>> cg.solve(torch.tensor([[3.0, 5.0], [1.0, 0.0]], dtype=torch.float64))
    tensor([[ 1.0000,  1.0000],
            [ 0.5714, -0.1429]], dtype=torch.float64)
    """

    def __init__(self, damping=0.0, tol=1e-6, max_iter=100):
        self.damping = damping
        self.tol = tol
        self.max_iter = max_iter

    def fit(self, A):
        """Store the curvature operator.

        Parameters
        ----------
        A : LinearOperator or Tensor of shape (p, p)

        Returns
        -------
        self : ConjugateGradientIHVP
        """
        _check_real(self.damping, "damping", low=0.0)
        _check_real(self.tol, "tol", low=0.0, strict=True)
        _check_int(self.max_iter, "max_iter")
        self.operator_ = _as_operator(A)
        return self

    def solve(self, B, X0=None, *, return_info=False):
        """Solve for every row of ``B`` at once.

        Parameters
        ----------
        B : Tensor of shape (m, p) or (p,)
        X0 : Tensor of the shape of ``B``, default=None
            Initial guess (zero by default).
        return_info : bool, default=False
            Also return ``{"n_iter": int, "residuals": Tensor of shape (m,)}``: the
            iterations run and the relative residual of every row.

        Returns
        -------
        X : Tensor of the shape of ``B``
        info : dict
            Only with ``return_info=True``.
        """
        _check_fitted(self, "operator_")
        op = self.operator_
        damping = float(self.damping)
        block, was_1d = _as_block(B, op.p, op.dtype, op.device)

        def apply(V):
            out = op.matvec(V)
            return out + damping * V if damping else out

        m = block.shape[0]
        b_norm = block.norm(dim=1)
        if X0 is None:
            X = torch.zeros_like(block)
            R = block.clone()
        else:
            X, _ = _as_block(X0, op.p, op.dtype, op.device)
            X = X.clone()
            R = block - apply(X)
        P = R.clone()
        rs = (R * R).sum(1)
        target = float(self.tol) * b_norm
        n_iter = 0
        for n_iter in range(1, int(self.max_iter) + 1):
            active = rs.sqrt() > target
            if not bool(active.any()):
                n_iter -= 1
                break
            idx = active.nonzero().squeeze(1)
            P_a = P[idx]
            AP = apply(P_a)
            curv = (P_a * AP).sum(1)
            if bool((curv <= 0).any()):
                raise ValueError(
                    "Conjugate gradient met a direction of non-positive curvature: the "
                    "curvature + damping * I is not positive definite. Increase the damping "
                    "(regularization), or use the Gauss-Newton curvature (hessian='ggn')."
                )
            alpha = rs[idx] / curv
            X[idx] += alpha[:, None] * P_a
            R_a = R[idx] - alpha[:, None] * AP
            rs_new = (R_a * R_a).sum(1)
            beta = rs_new / rs[idx]
            R[idx] = R_a
            P[idx] = R_a + beta[:, None] * P_a
            rs[idx] = rs_new
        residuals = rs.sqrt() / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
        unconverged = int((rs.sqrt() > target).sum())
        if unconverged:
            warnings.warn(
                f"Conjugate gradient did not converge in max_iter={self.max_iter} iterations "
                f"for {unconverged} of {m} vectors (largest relative residual "
                f"{float(residuals.max()):.3g} > tol={self.tol}). Increase max_iter or the "
                "damping.",
                ConvergenceWarning,
            )
        X = X[0] if was_1d else X
        return (X, {"n_iter": n_iter, "residuals": residuals}) if return_info else X


# --------------------------------------------------------------------------- LiSSA


class LissaIHVP:
    """Stochastic inverse-HVP by the LiSSA recursion (Agarwal et al., 2017).

    For each of ``n_samples`` repeats, starting from ``x_0 = b``::

        x_{t+1} = b + (I - (A_t + damping I) / scale) x_t,    t < depth,

    where ``A_t`` is the curvature of one batch drawn at random (with probability
    proportional to its weight, so that ``E[A_t] = A``); the estimate is
    ``x_depth / scale`` averaged over the repeats. It is the truncated Neumann
    series of ``(A + damping I)^{-1}`` and converges when ``scale`` exceeds the
    largest eigenvalue of every ``A_t + damping I``; the truncation error decays
    like ``(1 - (lambda_min + damping) / scale) ** depth``. All rows of ``B`` share
    the batch draws of a repeat (one batched product per step).

    Parameters
    ----------
    damping : float, default=0.0
    scale : float, default=10.0
        Must exceed the largest per-batch curvature eigenvalue plus damping.
    depth : int, default=1000
        Recursion steps per repeat.
    n_samples : int, default=1
        Independent repeats averaged.
    random_state : int, RandomState instance, torch.Generator or None, default=None
        Batch sampling. An int gives the same draws at every ``solve``.

    Attributes
    ----------
    operator_ : LinearOperator
    batches_ : list of (batch, weight)
        The operator's batches, held for random access.

    Raises
    ------
    ValueError
        In ``solve``, when the recursion diverges (``scale`` too small).

    References
    ----------
    Agarwal, Bullins and Hazan, "Second-order stochastic optimization for machine
    learning in linear time", JMLR 2017. Koh and Liang, "Understanding black-box
    predictions via influence functions", ICML 2017.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.ihvp import LissaIHVP
    >>> H = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    >>> lissa = LissaIHVP(scale=5.0, depth=200, random_state=0).fit(H)
    >>> lissa.solve(torch.tensor([[2.0, 2.0]], dtype=torch.float64))
    tensor([[1.0000, 0.5000]], dtype=torch.float64)
    """

    def __init__(self, damping=0.0, scale=10.0, depth=1000, n_samples=1, random_state=None):
        self.damping = damping
        self.scale = scale
        self.depth = depth
        self.n_samples = n_samples
        self.random_state = random_state

    def fit(self, A):
        """Store the operator and list its batches.

        Parameters
        ----------
        A : LinearOperator or Tensor of shape (p, p)

        Returns
        -------
        self : LissaIHVP
        """
        _check_real(self.damping, "damping", low=0.0)
        _check_real(self.scale, "scale", low=0.0, strict=True)
        _check_int(self.depth, "depth")
        _check_int(self.n_samples, "n_samples")
        self.operator_ = _as_operator(A)
        self.batches_ = [(b, w) for b, w in self.operator_.iter_batches() if w > 0]
        if not self.batches_:
            raise ValueError("The operator has no batch with positive weight.")
        return self

    def solve(self, B):
        """Estimate ``(A + damping I)^{-1} b`` for each row ``b`` of ``B``.

        Parameters
        ----------
        B : Tensor of shape (m, p) or (p,)

        Returns
        -------
        X : Tensor of the shape of ``B``
        """
        _check_fitted(self, "operator_")
        op = self.operator_
        block, was_1d = _as_block(B, op.p, op.dtype, op.device)
        damping, scale = float(self.damping), float(self.scale)
        weights = torch.tensor([w for _, w in self.batches_], dtype=torch.float64)
        gen = _torch_generator(self.random_state)
        total = torch.zeros_like(block)
        for _ in range(int(self.n_samples)):
            draws = torch.multinomial(weights, int(self.depth), replacement=True, generator=gen)
            X = block.clone()
            for step, index in enumerate(draws.tolist()):
                batch = self.batches_[index][0]
                AX = op.batch_matvec(batch, X)
                X = block + (1.0 - damping / scale) * X - AX / scale
                if step % 50 == 49 and not bool(torch.isfinite(X).all()):
                    break
            if not bool(torch.isfinite(X).all()):
                raise ValueError(
                    f"LiSSA diverged: scale={scale:g} is below the largest eigenvalue of the "
                    "per-batch curvature plus damping. Increase scale (or the batch size)."
                )
            total += X
        out = total / (int(self.n_samples) * scale)
        return out[0] if was_1d else out


# --------------------------------------------------------------------------- Arnoldi


def _orthogonalize(w, basis):
    """Gram-Schmidt of ``w`` against the rows of ``basis``, applied twice."""
    coef = basis @ w
    w = w - coef @ basis
    again = basis @ w
    return w - again @ basis, coef + again


def arnoldi(A, n_components, *, max_iter=100, random_state=None):
    """Top eigenpairs of a symmetric operator by Arnoldi iteration.

    Runs ``min(max_iter, p)`` Arnoldi steps from a seeded random unit vector, with
    full (twice-applied Gram-Schmidt) reorthogonalisation of every new Krylov
    vector; for a symmetric ``A`` this is the Lanczos method and the
    (symmetrised) Hessenberg matrix is tridiagonal. Its eigenpairs give Ritz
    values and vectors; the ``n_components`` of largest magnitude are returned.
    When the Krylov space becomes invariant (e.g. a repeated eigenvalue), the
    iteration restarts from a fresh random vector orthogonal to the basis, so
    that ``max_iter = p`` recovers every eigenpair. Each step costs one product of
    ``A`` with one vector.

    Parameters
    ----------
    A : LinearOperator or Tensor of shape (p, p)
        Symmetric operator.
    n_components : int
        Number of eigenpairs ``k`` to return (at most the Krylov dimension reached).
    max_iter : int, default=100
        Krylov dimension at most. Use ``max_iter >= n_components`` (a few times
        more for accurate eigenvectors); ``max_iter = p`` recovers every eigenpair.
    random_state : int, RandomState instance, torch.Generator or None, default=None
        Starting vector.

    Returns
    -------
    eigenvalues : Tensor of shape (k,)
        Ritz values, by decreasing magnitude.
    eigenvectors : Tensor of shape (k, p)
        Orthonormal Ritz vectors, one per row.

    References
    ----------
    Schioppa, Zablotskaia, Vilar and Sokolov, "Scaling up influence functions",
    AAAI 2022.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.ihvp import arnoldi
    >>> H = torch.diag(torch.tensor([1.0, 5.0, 3.0], dtype=torch.float64))
    >>> values, vectors = arnoldi(H, 2, max_iter=3, random_state=0)
    >>> values
    tensor([5., 3.], dtype=torch.float64)
    >>> vectors.abs().round()
    tensor([[0., 1., 0.],
            [0., 0., 1.]], dtype=torch.float64)
    """
    n_components = _check_int(n_components, "n_components")
    max_iter = _check_int(max_iter, "max_iter")
    op = _as_operator(A)
    p = op.p
    n_steps = min(max_iter, p)
    gen = _torch_generator(random_state)
    start = torch.randn(p, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
    Q = torch.zeros(n_steps + 1, p, dtype=op.dtype, device=op.device)
    T = torch.zeros(n_steps + 1, n_steps, dtype=op.dtype, device=op.device)
    Q[0] = start / start.norm()
    eps = torch.finfo(op.dtype).eps
    k = n_steps
    for j in range(n_steps):
        w = op.matvec(Q[j : j + 1])[0]
        w_norm = float(w.norm())
        basis = Q[: j + 1]
        w, coef = _orthogonalize(w, basis)
        T[: j + 1, j] = coef
        if j + 1 == n_steps:
            break
        beta = float(w.norm())
        if beta > 100 * eps * max(w_norm, 1e-300) * math.sqrt(p):
            T[j + 1, j] = beta
            Q[j + 1] = w / beta
            continue
        # invariant subspace (e.g. a repeated eigenvalue): restart the Krylov sequence
        # from a fresh random vector orthogonal to the basis, T[j + 1, j] staying 0
        fresh = torch.randn(p, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
        fresh, _ = _orthogonalize(fresh, basis)
        norm = float(fresh.norm())
        if norm <= 1e3 * eps * math.sqrt(p):
            k = j + 1
            break
        Q[j + 1] = fresh / norm
    H = T[:k, :k]
    H = 0.5 * (H + H.T)
    ritz_values, ritz_coef = torch.linalg.eigh(H)
    order = torch.argsort(ritz_values.abs(), descending=True)[:n_components]
    eigenvalues = ritz_values[order]
    eigenvectors = ritz_coef[:, order].T @ Q[:k]
    return eigenvalues, eigenvectors


class ArnoldiIHVP:
    """Inverse-HVP on the top eigenspace of the curvature (Schioppa et al., 2022).

    ``fit`` finds the top-``n_components`` eigenpairs ``(lambda_i, u_i)`` with
    :func:`arnoldi`; ``solve`` returns
    ``X = sum_i u_i (u_i . b) / (lambda_i + damping)`` for each row ``b`` of ``B``
    (the component of ``b`` outside the span of the ``u_i`` is dropped). With
    every component (``n_components = max_iter = p``) this is the exact inverse.

    Parameters
    ----------
    damping : float, default=0.0
    n_components : int, default=50
    max_iter : int, default=200
        Arnoldi steps (Krylov dimension) at most.
    random_state : int, RandomState instance, torch.Generator or None, default=None

    Attributes
    ----------
    eigenvalues_ : Tensor of shape (k,)
        Ritz values, by decreasing magnitude.
    eigenvectors_ : Tensor of shape (k, p)
        Orthonormal Ritz vectors, one per row.
    damping_ : float

    Raises
    ------
    ValueError
        In ``fit``, when a kept eigenvalue plus damping is not positive.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.ihvp import ArnoldiIHVP
    >>> H = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    >>> solver = ArnoldiIHVP(n_components=2, max_iter=2, random_state=0).fit(H)
    >>> solver.solve(torch.tensor([[2.0, 2.0]], dtype=torch.float64))
    tensor([[1.0000, 0.5000]], dtype=torch.float64)
    """

    def __init__(self, damping=0.0, n_components=50, max_iter=200, random_state=None):
        self.damping = damping
        self.n_components = n_components
        self.max_iter = max_iter
        self.random_state = random_state

    def fit(self, A):
        """Compute the top eigenpairs of ``A``.

        Parameters
        ----------
        A : LinearOperator or Tensor of shape (p, p)

        Returns
        -------
        self : ArnoldiIHVP
        """
        damping = _check_real(self.damping, "damping", low=0.0)
        eigenvalues, eigenvectors = arnoldi(
            A, self.n_components, max_iter=self.max_iter, random_state=self.random_state
        )
        scale = float(eigenvalues.abs().max()) if eigenvalues.numel() else 0.0
        eps = torch.finfo(eigenvalues.dtype).eps
        threshold = eps * max(scale, damping) * eigenvectors.shape[1]
        self.eigenvalues_, self.eigenvectors_ = _drop_null_space(
            eigenvalues, eigenvectors, damping, threshold, "The curvature on its top eigenspace")
        self.damping_ = damping
        return self

    def solve(self, B):
        """Apply the projected inverse to each row of ``B``.

        Parameters
        ----------
        B : Tensor of shape (m, p) or (p,)

        Returns
        -------
        X : Tensor of the shape of ``B``
        """
        _check_fitted(self, "eigenvalues_")
        return eigen_ihvp(self.eigenvalues_, self.eigenvectors_, B, self.damping_)
