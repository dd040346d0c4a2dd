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
import warnings

import torch
from sklearn.exceptions import ConvergenceWarning

from .._utils import _torch_generator
from ._cg import ConjugateGradientIHVP
from ._ihvp_checks import (
    _as_operator,
    _check_fitted,
    _check_int,
    _check_real,
    _drop_null_space,
)
from .hessian import DenseOperator, _as_block

__all__ = [
    "ExplicitIHVP",
    "ConjugateGradientIHVP",
    "LissaIHVP",
    "ArnoldiIHVP",
    "arnoldi",
    "eigen_ihvp",
]


# --------------------------------------------------------------------------- eigenpairs


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
    """Exact inverse-HVP from a factorisation of the dense curvature.

    ``fit`` materialises ``A`` as a ``(p, p)`` matrix (for a
    :class:`~skdattri.func.hessian.HessianOperator` with
    :func:`~skdattri.func.hessian.hessian`), and factorises it once: by Cholesky
    when the damping makes ``A + damping I`` safely positive definite (see
    ``cholesky_``), else by an eigendecomposition that drops the numerical null
    space (a pseudo-inverse) or reports an indefinite curvature; ``solve`` costs two
    ``(m, p) x (p, p)`` products or triangular solves.

    Parameters
    ----------
    damping : float, default=0.0
        ``lambda`` in ``(A + lambda I)^{-1}``.
    max_memory : int, default=2**31
        Largest size in bytes of the dense ``(p, p)`` matrix (``p**2`` floats of the
        operator's dtype): 2 GiB holds ``p`` up to 23,170 in float32, 16,384 in float64.

    Attributes
    ----------
    eigenvalues_ : Tensor of shape (k,) or None
        Eigenvalues of ``A`` (without damping) kept by the eigendecomposition,
        ascending; ``None`` when ``A + damping I`` was factorised by Cholesky.
    eigenvectors_ : Tensor of shape (k, p) or None
        Orthonormal eigenvectors, one per row (``None`` with Cholesky).
    cholesky_ : Tensor of shape (p, p) or None
        Lower Cholesky factor of ``A + damping I`` when it exists and either
        ``p > 4096`` or the damping exceeds ``2 p eps ||A||_F`` (``eps`` of the
        dtype): then no eigenvalue could fall below the null-space threshold of the
        eigendecomposition, whose solve would be the same inverse, and the factor
        costs a tenth of the time (650 parameters: 6 ms against 75 ms).
    damping_ : float
        The validated damping used by ``solve``.

    Raises
    ------
    ValueError
        In ``fit``, when the dense matrix exceeds ``max_memory`` or when
        ``A + damping I`` is not positive definite.

    Examples
    --------
    >>> import torch
    >>> from skdattri.func.ihvp import ExplicitIHVP
    >>> H = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    >>> ExplicitIHVP(damping=0.0).fit(H).solve(torch.tensor([[2.0, 2.0]], dtype=torch.float64))
    tensor([[1.0000, 0.5000]], dtype=torch.float64)
    """

    # above this many parameters a positive-definite curvature is factorised by Cholesky
    _cholesky_from = 4096
    # below it too when the damping dominates rounding (False: always eigh below)
    _cholesky_when_damped = True

    def __init__(self, damping=0.0, max_memory=2**31):
        self.damping = damping
        self.max_memory = max_memory

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
        max_memory = _check_int(self.max_memory, "max_memory")
        op = _as_operator(A)
        need = op.p**2 * torch.finfo(op.dtype).bits // 8
        if need > max_memory:
            raise ValueError(
                f"The explicit solver needs a dense {op.p} x {op.p} curvature matrix "
                f"({need / 2**30:.2f} GiB in {op.dtype}), above max_memory={max_memory} "
                f"bytes ({max_memory / 2**30:.2f} GiB). Raise max_memory, use the 'cg', "
                "'arnoldi' or 'ekfac' solver, or restrict the parameters (layers=).")
        dense = op.to_dense()
        self.damping_ = damping
        self.eigenvalues_ = self.eigenvectors_ = self.cholesky_ = None
        eps = torch.finfo(dense.dtype).eps
        if op.p > self._cholesky_from or (
                self._cholesky_when_damped
                and damping > 2 * op.p * eps * float(torch.linalg.matrix_norm(dense))):
            dense.diagonal().add_(damping)
            factor, info = torch.linalg.cholesky_ex(dense)
            if int(info) == 0:
                self.cholesky_ = factor
                return self
            dense.diagonal().sub_(damping)  # not positive definite: eigh says why
            del factor
        eigenvalues, eigenvectors = torch.linalg.eigh(dense)
        del dense
        scale = float(eigenvalues.abs().max()) if eigenvalues.numel() else 0.0
        threshold = op.p * torch.finfo(eigenvalues.dtype).eps * max(scale, damping)
        self.eigenvalues_, self.eigenvectors_ = _drop_null_space(
            eigenvalues, eigenvectors.T, damping, threshold, "The curvature")
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
        _check_fitted(self, "damping_")
        if self.cholesky_ is None:
            return eigen_ihvp(self.eigenvalues_, self.eigenvectors_, B, self.damping_)
        L = self.cholesky_
        block, was_1d = _as_block(B, L.shape[0], L.dtype, L.device)
        out = torch.cholesky_solve(block.T, L).T
        return out[0] if was_1d else out


# --------------------------------------------------------------------------- LiSSA


def _top_eigenvalue(op, n_iter=20, random_state=0):
    """Largest eigenvalue of a positive semi-definite operator, by power iteration."""
    gen = _torch_generator(random_state)
    v = torch.randn(op.p, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
    v = v / v.norm()
    value = 0.0
    for _ in range(n_iter):
        w = op.matvec(v)
        value = float(v @ w)
        norm = float(w.norm())
        if not norm > 0:
            break
        v = w / norm
    return max(value, 0.0), v


class LissaIHVP:
    """Stochastic inverse-HVP by the LiSSA recursion (Agarwal et al., 2017).

    For each of ``n_samples`` repeats, starting from ``x_0 = b``::

        x_{t+1} = b + (I - (A_t + damping I) / scale) x_t,    t < depth,

    where ``A_t`` is the curvature of one batch drawn at random (with probability
    proportional to its weight, so that ``E[A_t] = A``); the estimate is
    ``x_T / scale`` averaged over the repeats. It is the truncated Neumann series of
    ``(A + damping I)^{-1}`` and converges when ``scale`` exceeds the largest
    eigenvalue of every ``A_t + damping I``; the truncation error decays like
    ``(1 - (lambda_min + damping) / scale) ** t``, so the smallest workable ``scale``
    converges fastest. All rows of ``B`` share the batch draws of a repeat (one batched
    product per step).

    Parameters
    ----------
    damping : float, default=0.0
    scale : float or "auto", default="auto"
        Must exceed the largest per-batch curvature eigenvalue plus damping.
        ``"auto"``: 1.5 times the larger of the top eigenvalue of the full curvature
        (20 power iterations in ``fit``) and the per-batch curvatures along its
        eigenvector, plus the damping.
    depth : int, default=1000
        Recursion steps per repeat at most.
    n_samples : int, default=1
        Independent repeats averaged.
    tol : float, default=1e-6
        The recursion of a repeat stops when a step changes its iterate by at most
        ``tol`` relative to the iterate (every row), or -- for a stochastic operator --
        when the truncation error bound ``(1 - damping / scale) ** t`` falls below
        ``tol``; :class:`~sklearn.exceptions.ConvergenceWarning` when ``depth`` runs
        out before either.
    random_state : int, RandomState instance, torch.Generator or None, default=None
        Batch sampling. An int gives the same draws at every ``solve``.

    Attributes
    ----------
    operator_ : LinearOperator
    batches_ : list of (batch, weight)
        The operator's batches, held for random access.
    scale_ : float
        The scale used (``scale`` resolved).

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

    def __init__(self, damping=0.0, scale="auto", depth=1000, n_samples=1, tol=1e-6,
                 random_state=None):
        self.damping = damping
        self.scale = scale
        self.depth = depth
        self.n_samples = n_samples
        self.tol = tol
        self.random_state = random_state

    def fit(self, A):
        """Store the operator, list its batches and resolve ``scale``.

        Parameters
        ----------
        A : LinearOperator or Tensor of shape (p, p)

        Returns
        -------
        self : LissaIHVP
        """
        damping = _check_real(self.damping, "damping", low=0.0)
        _check_real(self.tol, "tol", low=0.0, strict=True)
        _check_int(self.depth, "depth")
        _check_int(self.n_samples, "n_samples")
        self.operator_ = _as_operator(A)
        self.batches_ = [(b, w) for b, w in self.operator_.iter_batches() if w > 0]
        if not self.batches_:
            raise ValueError("The operator has no batch with positive weight.")
        if isinstance(self.scale, str) and self.scale == "auto":
            top, v = _top_eigenvalue(self.operator_)
            per_batch = [float(v @ self.operator_.batch_matvec(b, v)) for b, _ in self.batches_]
            self.scale_ = 1.5 * max([top, *per_batch]) + damping
            if not self.scale_ > 0:
                self.scale_ = 1.0
        else:
            self.scale_ = _check_real(self.scale, "scale", low=0.0, strict=True)
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
        # a linear model's own layout of the rows: its products need no gathers
        native = getattr(op, "native_rows", lambda: None)()
        if native is not None:
            block, batch_matvec = native.to_native(block), native.batch_matvec
        else:
            batch_matvec = op.batch_matvec
        damping, scale, tol = float(self.damping), self.scale_, float(self.tol)
        weights = torch.tensor([w for _, w in self.batches_], dtype=torch.float64)
        stochastic = len(self.batches_) > 1
        # steps after which the truncation bound (1 - damping / scale)^t is below tol
        bound_steps = (math.log(tol) / math.log1p(-damping / scale)
                       if 0 < damping < scale else math.inf)
        gen = _torch_generator(self.random_state)
        total = None
        unconverged = 0
        for _ in range(int(self.n_samples)):
            draws = torch.multinomial(weights, int(self.depth), replacement=True, generator=gen)
            X = block.clone()
            converged = False
            for step, index in enumerate(draws.tolist()):
                AX = batch_matvec(self.batches_[index][0], X)
                if AX.data_ptr() in (block.data_ptr(), X.data_ptr()):
                    AX = AX.clone()  # an operator that returned its input
                # new = block + (1 - damping / scale) X - AX / scale, in AX's memory
                new = torch.add(block, AX, alpha=-1.0 / scale, out=AX).add_(
                    X, alpha=1.0 - damping / scale)
                size = new.flatten(1).norm(dim=1)
                if not bool(torch.isfinite(size).all()):
                    X = new
                    break
                small = X.sub_(new).flatten(1).norm(dim=1) <= tol * size  # X is replaced next
                X = new
                if bool(small.all()) or (stochastic and step + 1 >= bound_steps):
                    converged = True
                    break
            if not bool(torch.isfinite(X.flatten(1).norm(dim=1)).all()):
                raise ValueError(
                    f"LiSSA diverged: scale={scale:g} is below the largest eigenvalue of the "
                    "per-batch curvature plus damping. Increase scale (or the batch size).")
            unconverged += not converged
            total = X if total is None else total.add_(X)
        if unconverged:
            if stochastic and math.isfinite(bound_steps):
                bound = (1.0 - damping / scale) ** int(self.depth)
                why = (f"the truncation error bound (1 - damping / scale)^depth is {bound:.2g} "
                       f"> tol={tol:g}; about {int(math.ceil(bound_steps))} steps reach tol")
            else:
                why = f"the last step still changed the estimate by more than tol={tol:g}"
            warnings.warn(
                f"LiSSA stopped at depth={self.depth} before converging in {unconverged} of "
                f"{self.n_samples} repeats: {why}. Increase depth or the damping "
                "(regularization).", ConvergenceWarning)
        out = total.div_(int(self.n_samples) * scale)  # total: this solve's own memory
        if native is not None:
            out = native.from_native(out)
        return out[0] if was_1d else out


# --------------------------------------------------------------------------- Arnoldi


def _orthogonalize(w, basis):
    """Gram-Schmidt of ``w`` against the rows of ``basis``, applied twice."""
    coef = torch.mv(basis, w)
    w = torch.addmv(w, basis.T, coef, alpha=-1.0)
    again = torch.mv(basis, w)
    return torch.addmv(w, basis.T, again, alpha=-1.0), coef.add_(again)


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
    # a formed matrix: one matrix-vector product a step, without the block checks
    product = ((lambda v, M=op.matrix: torch.mv(M, v)) if isinstance(op, DenseOperator)
               else (lambda v: op.matvec(v[None])[0]))
    for j in range(n_steps):
        w = product(Q[j])
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


def _trace_coverage(op, eigenvalues, random_state, n_probes=16):
    """Share of ``trace(A)`` held by ``eigenvalues`` (Hutchinson trace estimate, one
    block product of ``n_probes`` Rademacher vectors); 1 for an exact trace of zero."""
    gen = _torch_generator(random_state)
    probes = (torch.randint(0, 2, (n_probes, op.p), generator=gen) * 2 - 1).to(
        dtype=op.dtype, device=op.device)
    trace = float((probes * op.matvec(probes)).sum()) / n_probes
    kept = float(eigenvalues.clamp_min(0).sum())
    return 1.0 if trace <= 0 else min(1.0, kept / trace)


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
    coverage_ : float
        Share of the curvature's trace held by the kept eigenvalues (a Hutchinson
        estimate of the trace from 16 random probes); below 0.5 ``fit`` warns
        (:class:`~sklearn.exceptions.ConvergenceWarning`): the dropped directions
        carry most of the curvature.

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

    # a ConvergenceWarning below this share of the trace held by the kept eigenpairs
    _min_coverage = 0.5

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
        self.coverage_ = _trace_coverage(_as_operator(A), self.eigenvalues_, self.random_state)
        if self.coverage_ < self._min_coverage:
            warnings.warn(
                f"The {self.eigenvalues_.numel()} eigenpairs kept by Arnoldi cover "
                f"{self.coverage_:.0%} of the curvature's trace (estimated): directions "
                "outside them are dropped from every inverse-HVP. Increase n_components "
                "(and max_iter), or use the 'cg' solver.", ConvergenceWarning)
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
