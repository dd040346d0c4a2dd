"""Inverse-HVP solvers against the explicit inverse on logistic regression (float64)."""

import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.exceptions import ConvergenceWarning, NotFittedError

from skdattri.estimator_checks import assert_scores_close
from skdattri.func.hessian import HessianOperator, LinearOperator, hessian
from skdattri.func.ihvp import (
    ArnoldiIHVP,
    ConjugateGradientIHVP,
    ExplicitIHVP,
    LissaIHVP,
    arnoldi,
    eigen_ihvp,
)

DT = torch.float64
DAMPING = 1e-3


def _batches(X, y, batch_size):
    return [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(X), batch_size)]


@pytest.fixture(scope="module")
def logreg():
    """Multiclass logistic regression (5 features, 3 classes, p = 18) with an L2 term."""
    gen = torch.Generator().manual_seed(0)
    n = 60
    X = torch.randn(n, 5, generator=gen, dtype=DT)
    true_w = torch.randn(3, 5, generator=gen, dtype=DT)
    y = torch.multinomial(torch.softmax(X @ true_w.T, 1), 1, generator=gen)[:, 0]
    params = {
        "weight": 0.5 * torch.randn(3, 5, generator=gen, dtype=DT),
        "bias": 0.1 * torch.randn(3, generator=gen, dtype=DT),
    }

    def loss_fn(p, batch):
        return F.cross_entropy(batch[0] @ p["weight"].T + p["bias"], batch[1])

    l2 = 0.01
    H = hessian(loss_fn, params, _batches(X, y, n), l2=l2)
    B = torch.randn(7, 18, generator=gen, dtype=DT)  # 7 query vectors
    exact = torch.linalg.solve(H + DAMPING * torch.eye(18, dtype=DT), B.T).T
    return X, y, params, loss_fn, l2, H, B, exact


def _operator(logreg, batch_size):
    X, y, params, loss_fn, l2, *_ = logreg
    return HessianOperator(loss_fn, params, _batches(X, y, batch_size), l2=l2)


def test_explicit_equals_linear_solve(logreg):
    *_, H, B, exact = logreg
    solver = ExplicitIHVP(damping=DAMPING).fit(_operator(logreg, 13))
    assert_scores_close(solver.solve(B), exact)
    # the damping dominates rounding: Cholesky; without damping: the eigendecomposition
    assert solver.cholesky_.shape == (18, 18) and solver.eigenvalues_ is None
    undamped = ExplicitIHVP().fit(_operator(logreg, 13))
    assert undamped.cholesky_ is None
    assert undamped.eigenvalues_.shape == (18,) and undamped.eigenvectors_.shape == (18, 18)
    assert_scores_close(undamped.solve(B), torch.linalg.solve(H, B.T).T)
    # the dense matrix is accepted as well; a single vector keeps its shape
    solver = ExplicitIHVP(damping=DAMPING).fit(H)
    assert_scores_close(solver.solve(B[0]), exact[0])
    # fitted solvers pickle (tensors only)
    again = pickle.loads(pickle.dumps(solver))
    assert_scores_close(again.solve(B), exact)


def test_explicit_refuses_above_max_memory(logreg):
    with pytest.raises(ValueError, match="max_memory=100 bytes.*Raise max_memory.*'cg'"):
        ExplicitIHVP(max_memory=100).fit(_operator(logreg, 60))


def test_explicit_cholesky_path_equals_eigendecomposition(logreg, monkeypatch):
    *_, B, exact = logreg
    op = _operator(logreg, 60)
    monkeypatch.setattr(ExplicitIHVP, "_cholesky_when_damped", False)
    eig = ExplicitIHVP(damping=DAMPING).fit(op)
    monkeypatch.setattr(ExplicitIHVP, "_cholesky_from", 1)
    chol = ExplicitIHVP(damping=DAMPING).fit(op)
    assert eig.cholesky_ is None and chol.cholesky_ is not None and chol.eigenvalues_ is None
    assert_scores_close(chol.solve(B), eig.solve(B))
    assert_scores_close(chol.solve(B[0]), eig.solve(B[0]))
    # an indefinite matrix falls back to the eigendecomposition and its clear error
    with pytest.raises(ValueError, match="not positive definite"):
        ExplicitIHVP().fit(torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=DT)))


def test_explicit_refuses_indefinite():
    A = torch.diag(torch.tensor([2.0, -1.0, 0.5], dtype=DT))
    with pytest.raises(ValueError, match="not positive definite.*damping"):
        ExplicitIHVP(damping=0.5).fit(A)
    X = ExplicitIHVP(damping=1.5).fit(A).solve(torch.ones(3, dtype=DT))
    torch.testing.assert_close(X, torch.tensor([1 / 3.5, 1 / 0.5, 1 / 2.0], dtype=DT))


@pytest.mark.parametrize("batch_size", [1, 13, 60])
def test_cg_equals_explicit_for_any_batch_size(logreg, batch_size):
    *_, exact = logreg
    B = logreg[6]
    cg = ConjugateGradientIHVP(damping=DAMPING, tol=1e-12, max_iter=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        X, info = cg.fit(_operator(logreg, batch_size)).solve(B, return_info=True)
    assert_scores_close(X, exact, rtol=1e-8)
    assert info["n_iter"] <= 40  # p = 18: CG terminates in about p steps
    assert float(info["residuals"].max()) <= 1e-12
    assert not hasattr(cg, "n_iter_")  # solve leaves the fitted solver as it was


def test_cg_warns_at_max_iter(logreg):
    B = logreg[6]
    cg = ConjugateGradientIHVP(damping=DAMPING, tol=1e-12, max_iter=2).fit(_operator(logreg, 60))
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        _, info = cg.solve(B, return_info=True)
    assert info["n_iter"] == 2


def test_cg_zero_rows_and_initial_guess(logreg):
    *_, B, exact = logreg
    cg = ConjugateGradientIHVP(damping=DAMPING, tol=1e-12, max_iter=100).fit(logreg[5])
    B0 = B.clone()
    B0[2] = 0.0
    X = cg.solve(B0)
    assert torch.all(X[2] == 0)
    assert_scores_close(X[[0, 1, 3]], exact[[0, 1, 3]], rtol=1e-8)
    X, info = cg.solve(B, X0=exact, return_info=True)  # already converged
    assert info["n_iter"] == 0
    assert_scores_close(X, exact)


def test_cg_refuses_indefinite():
    A = torch.diag(torch.tensor([2.0, -1.0, 0.5], dtype=DT))
    with pytest.raises(ValueError, match="not positive definite"):
        ConjugateGradientIHVP().fit(A).solve(torch.ones(1, 3, dtype=DT))


def test_cg_preconditioned_on_a_formed_matrix(logreg):
    """On a dense curvature CG is preconditioned by its Cholesky factor: the solution
    of plain CG in a step or two, every row (zero rows, an initial guess, one vector)."""
    *_, H, B, exact = logreg
    plain = ConjugateGradientIHVP(damping=DAMPING, tol=1e-12, max_iter=200,
                                  preconditioner=None).fit(H)
    pre = ConjugateGradientIHVP(damping=DAMPING, tol=1e-12, max_iter=200).fit(H)
    assert plain.cholesky_ is None and pre.cholesky_.shape == (18, 18)
    X_plain, info_plain = plain.solve(B, return_info=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        X, info = pre.solve(B, return_info=True)
    assert_scores_close(X, exact, rtol=1e-10)
    assert_scores_close(X, X_plain, rtol=1e-10)
    assert info["n_iter"] <= 2 < info_plain["n_iter"]
    assert float(info["residuals"].max()) <= 1e-12
    B0 = B.clone()
    B0[2] = 0.0
    X0 = pre.solve(B0)
    assert torch.all(X0[2] == 0)
    assert_scores_close(X0[[0, 1, 3]], exact[[0, 1, 3]], rtol=1e-10)
    assert_scores_close(pre.solve(B[1]), exact[1], rtol=1e-10)
    X_warm, info = pre.solve(B, X0=exact, return_info=True)
    assert info["n_iter"] == 0
    assert_scores_close(X_warm, exact)
    # the batched operator is not formed: plain CG, as before
    assert ConjugateGradientIHVP(damping=DAMPING).fit(_operator(logreg, 60)).cholesky_ is None


def test_cg_preconditioner_checks():
    A = torch.diag(torch.tensor([2.0, -1.0, 0.5], dtype=DT))
    cg = ConjugateGradientIHVP().fit(A)  # indefinite: no factor, plain CG says why
    assert cg.cholesky_ is None
    with pytest.raises(ValueError, match="not positive definite"):
        cg.solve(torch.ones(1, 3, dtype=DT))
    with pytest.raises(ValueError, match="preconditioner must be 'auto' or None"):
        ConjugateGradientIHVP(preconditioner="jacobi").fit(torch.eye(3, dtype=DT))


class _DenseBatches(LinearOperator):
    """Per-batch dense Hessians (with their L2 term) behind the LinearOperator API."""

    def __init__(self, logreg, batch_size):
        X, y, params, loss_fn, l2, *_ = logreg
        batches = _batches(X, y, batch_size)
        self.parts = [hessian(loss_fn, params, [b], l2=l2) for b in batches]
        self.batches = [(i, float(len(b[0]))) for i, b in enumerate(batches)]
        total = sum(w for _, w in self.batches)
        self.full = sum(w * H for (_, w), H in zip(self.batches, self.parts, strict=True)) / total
        super().__init__(18, DT, "cpu")

    def matvec(self, V):
        return V @ self.full

    def iter_batches(self):
        return iter(self.batches)

    def batch_matvec(self, batch, V):
        return V @ self.parts[batch]


def test_lissa_full_batch_converges_to_explicit(logreg):
    """One batch: the deterministic Neumann series; error (1 - lambda_min/scale)**depth."""
    *_, H, B, exact = logreg
    scale = 1.05 * float(torch.linalg.eigvalsh(H)[-1] + DAMPING)
    lissa = LissaIHVP(damping=DAMPING, scale=scale, depth=1500, tol=1e-13, random_state=0)
    X = lissa.fit(H).solve(B)
    assert_scores_close(X, exact, rtol=1e-8)
    # a looser tol stops earlier, at a correspondingly looser estimate
    X_early = LissaIHVP(damping=DAMPING, scale=scale, depth=1500, tol=1e-4).fit(H).solve(B)
    err = float((X_early - exact).norm() / exact.norm())
    assert 1e-8 < err < 1e-1


def test_lissa_stochastic_agrees_with_explicit(logreg):
    """Mini-batches of 10 samples, drawn at random: stochastic recursion, averaged.

    Thresholds: relative Frobenius error < 0.05 and Spearman >= 0.99 over the
    entries of X (observed 0.004-0.01 and > 0.9998 over seeds 0-4).
    """
    *_, B, exact = logreg
    op = _DenseBatches(logreg, 10)
    assert_scores_close(op.full, logreg[5])
    lissa = LissaIHVP(damping=DAMPING, scale=1.0, depth=1000, n_samples=16, random_state=0)
    X = lissa.fit(op).solve(B)
    rel = float((X - exact).norm() / exact.norm())
    assert rel < 0.05
    assert spearmanr(X.ravel(), exact.ravel())[0] >= 0.99
    # a single repeat is noisier than the average of 16
    single = LissaIHVP(damping=DAMPING, scale=1.0, depth=1000, n_samples=1, random_state=0)
    assert float((single.fit(op).solve(B) - exact).norm() / exact.norm()) > rel
    # reproducible with an int random_state, different with another seed
    again = LissaIHVP(damping=DAMPING, scale=1.0, depth=1000, n_samples=16, random_state=0)
    torch.testing.assert_close(again.fit(op).solve(B), X, rtol=0, atol=0)
    other = LissaIHVP(damping=DAMPING, scale=1.0, depth=1000, n_samples=16, random_state=1)
    assert not torch.equal(other.fit(op).solve(B), X)


def test_lissa_on_hessian_operator_samples_its_batches(logreg):
    """Same draws on the autodiff operator and on the dense per-batch Hessians."""
    B = logreg[6]
    kwargs = dict(damping=DAMPING, scale=1.0, depth=30, n_samples=2, random_state=3)
    X = LissaIHVP(**kwargs).fit(_operator(logreg, 20)).solve(B)
    expected = LissaIHVP(**kwargs).fit(_DenseBatches(logreg, 20)).solve(B)
    assert_scores_close(X, expected)


def test_lissa_diverges_with_small_scale(logreg):
    lissa = LissaIHVP(damping=DAMPING, scale=0.01, depth=2000, random_state=0)
    with pytest.raises(ValueError, match="diverged.*scale"):
        lissa.fit(logreg[5]).solve(logreg[6])


@pytest.mark.parametrize("batch_size", [13, 60])
def test_arnoldi_all_components_equals_explicit(logreg, batch_size):
    *_, exact = logreg
    B = logreg[6]
    solver = ArnoldiIHVP(damping=DAMPING, n_components=18, max_iter=18, random_state=0)
    X = solver.fit(_operator(logreg, batch_size)).solve(B)
    assert_scores_close(X, exact, rtol=1e-8)
    assert solver.eigenvectors_.shape == (18, 18)
    gram = solver.eigenvectors_ @ solver.eigenvectors_.T
    assert_scores_close(gram, torch.eye(18, dtype=DT))


def test_arnoldi_top_eigenpairs(logreg):
    H = logreg[5]
    lam, vec = torch.linalg.eigh(H)
    values, vectors = arnoldi(H, 4, max_iter=18, random_state=0)
    assert_scores_close(values, lam.flip(0)[:4], rtol=1e-10)
    # each Ritz vector is an eigenvector: H u = lambda u
    assert_scores_close(vectors @ H, values[:, None] * vectors, rtol=1e-9)
    # truncated solve = exact inverse restricted to the top eigenspace
    B = logreg[6]
    top = vec[:, -4:].T
    expected = ((B @ top.T) / (lam[-4:] + DAMPING)) @ top
    X = ArnoldiIHVP(damping=DAMPING, n_components=4, max_iter=18, random_state=0).fit(H).solve(B)
    assert_scores_close(X, expected, rtol=1e-8)
    assert_scores_close(eigen_ihvp(lam, vec.T, B, DAMPING), logreg[7])


def test_not_fitted_and_bad_parameters(logreg):
    B = logreg[6]
    for solver in (ExplicitIHVP(), ConjugateGradientIHVP(), LissaIHVP(), ArnoldiIHVP()):
        with pytest.raises(NotFittedError):
            solver.solve(B)
    with pytest.raises(ValueError, match="damping"):
        ExplicitIHVP(damping=-1.0).fit(logreg[5])
    with pytest.raises(ValueError, match="tol"):
        ConjugateGradientIHVP(tol=0.0).fit(logreg[5])
    with pytest.raises(ValueError, match="scale"):
        LissaIHVP(scale=0.0).fit(logreg[5])
    with pytest.raises(TypeError, match="LinearOperator"):
        ExplicitIHVP().fit("not an operator")
    with pytest.raises(ValueError, match="shape"):
        ExplicitIHVP().fit(logreg[5]).solve(torch.zeros(2, 5, dtype=DT))


def test_lissa_auto_scale_exceeds_every_batch_curvature(logreg):
    *_, B, exact = logreg
    op = _DenseBatches(logreg, 10)
    lissa = LissaIHVP(damping=DAMPING, depth=3000, n_samples=8, random_state=0).fit(op)
    top_batch = max(float(torch.linalg.eigvalsh(H)[-1]) for H in op.parts)
    assert top_batch < lissa.scale_ < 3 * top_batch + DAMPING
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        X = lissa.solve(B)
    assert float((X - exact).norm() / exact.norm()) < 0.1


def test_lissa_warns_when_depth_runs_out(logreg):
    op = _DenseBatches(logreg, 10)
    lissa = LissaIHVP(damping=DAMPING, depth=20, random_state=0).fit(op)
    with pytest.warns(ConvergenceWarning, match="depth=20.*truncation error bound"):
        lissa.solve(logreg[6])
    deterministic = LissaIHVP(damping=DAMPING, depth=5).fit(logreg[5])
    with pytest.warns(ConvergenceWarning, match="depth=5.*changed the estimate"):
        deterministic.solve(logreg[6])


def test_arnoldi_warns_when_the_kept_eigenpairs_cover_little():
    H = torch.diag(torch.linspace(1.0, 2.0, 40, dtype=DT))  # a flat spectrum
    with pytest.warns(ConvergenceWarning, match="cover .* of the curvature's trace"):
        few = ArnoldiIHVP(n_components=2, max_iter=10, random_state=0).fit(H)
    assert few.coverage_ < 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        every = ArnoldiIHVP(n_components=40, max_iter=40, random_state=0).fit(H)
    assert every.coverage_ > 0.8


def _fisher_problem(n=30, p=80, seed=0):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(n, p, generator=gen, dtype=DT)
    G[-1] = G[0] + G[1]  # a rank-deficient Gram matrix: its null direction is dropped
    B = torch.randn(6, p, generator=gen, dtype=DT)
    B[2] = G[:4].T @ torch.randn(4, generator=gen, dtype=DT)  # inside the rows' span
    B[4] = 0.0
    return G, B


@pytest.mark.parametrize("max_iter", [1, 3, 9, 200])
@pytest.mark.parametrize("batch_size", [7, 30])
def test_cg_in_row_space_equals_the_recursion_on_g(max_iter, batch_size):
    """Fewer training rows than parameters: the empirical Fisher's CG runs in the
    eigenbasis of the rows' span, and every iterate equals the plain recursion's (the
    same step count, residuals and, unconverged, the same solution)."""
    from skdattri.func.fisher import EmpiricalFisherOperator

    G, B = _fisher_problem()
    op = EmpiricalFisherOperator(G, l2=0.05, batch_size=batch_size)
    cg = ConjugateGradientIHVP(damping=0.01, tol=1e-10, max_iter=max_iter).fit(op)
    W, s = cg.row_space_
    assert W.shape == (30, 29)  # rank 29: the repeated row's direction is not kept
    Q = G.T @ W
    torch.testing.assert_close(Q.T @ Q, torch.eye(29, dtype=DT), rtol=0, atol=1e-12)
    plain = ConjugateGradientIHVP(damping=0.01, tol=1e-10, max_iter=max_iter).fit(op)
    plain.row_space_ = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        X, info = cg.solve(B, return_info=True)
        ref, ref_info = plain.solve(B, return_info=True)
    assert_scores_close(X, ref, rtol=1e-9)
    assert info["n_iter"] == ref_info["n_iter"]
    torch.testing.assert_close(info["residuals"], ref_info["residuals"], rtol=0,
                               atol=1e-9)
    assert torch.all(X[4] == 0)
    if max_iter == 200:  # converged: the closed form
        F = G.T @ G / 30 + 0.06 * torch.eye(80, dtype=DT)
        assert_scores_close(X, torch.linalg.solve(F, B.T).T, rtol=1e-8)


def test_cg_in_row_space_only_where_it_holds():
    """No row space for more rows than columns or a per-coordinate l2; a given initial
    guess takes the plain recursion; a singular system raises as the plain one does."""
    from skdattri.func.fisher import EmpiricalFisherOperator

    G, B = _fisher_problem()
    assert EmpiricalFisherOperator(G[:, :20]).row_space() is None  # 30 rows, 20 columns
    assert EmpiricalFisherOperator(G, l2=torch.full((80,), 0.1, dtype=DT)).row_space() is None
    op = EmpiricalFisherOperator(G, l2=0.05)
    cg = ConjugateGradientIHVP(damping=0.01, tol=1e-12, max_iter=200).fit(op)
    X0 = torch.zeros_like(B)
    assert_scores_close(cg.solve(B, X0=X0), cg.solve(B), rtol=1e-8)
    # undamped, a vector orthogonal to every row meets zero curvature at once, on both
    # paths
    G[:, 70:] = 0.0
    b = torch.zeros(1, 80, dtype=DT)
    b[0, 75] = 1.0
    singular = ConjugateGradientIHVP(damping=0.0).fit(EmpiricalFisherOperator(G))
    assert singular.row_space_ is not None
    for row_space in (singular.row_space_, None):
        singular.row_space_ = row_space
        with pytest.raises(ValueError, match="not positive definite"):
            singular.solve(b)
