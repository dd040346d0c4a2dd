"""The curvature methods of the peer libraries: Nystrom sketch (pyDVL), diagonal and
K-FAC (kronfluence), each against a closed form or a hand-built reference (float64)."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from skdattri import InfluenceFunction
from skdattri.func.kfac import fit_ekfac
from skdattri.func.sketch import DiagonalIHVP, NystromIHVP, gradient_square_mean

from .test_influence import _closed_form

EPS = np.finfo(np.float64).eps


def _close(actual, desired, ulps):
    """Agreement up to ``ulps`` round-offs of the largest reference value."""
    np.testing.assert_allclose(actual, desired, rtol=0,
                               atol=ulps * EPS * np.abs(desired).max())


@pytest.fixture(scope="module")
def lr_digits(digits):
    X, y, Xq, yq = digits
    model = LogisticRegression(C=1.0, tol=1e-10, max_iter=5000).fit(X, y)
    return model, X, y, Xq[:20], yq[:20]


def _lr_grads(model, A, labels):
    """numpy per-sample gradients of sklearn's multinomial LR, skdattri's flat layout
    (coef_ row-major, then intercept_), and the predicted probabilities."""
    z = A @ model.coef_.T + model.intercept_
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    r = p.copy()
    r[np.arange(len(labels)), labels] -= 1.0
    return np.concatenate([(r[:, :, None] * A[:, None, :]).reshape(len(A), -1), r], 1), p


def _lr_l2(model, n):
    """Diagonal of the Hessian of sklearn's penalty ||W||^2 / (2 C n) (none on intercepts)."""
    K, d = model.coef_.shape
    return np.r_[np.full(K * d, 1.0 / (model.C * n)), np.zeros(K)]


# ----------------------------------------------------------------------------- Nystrom


def test_nystrom_of_full_rank_is_the_closed_form_influence(lr_digits):
    model, X, y, Xq, yq = lr_digits
    p = model.coef_.size + model.intercept_.size
    # no damping: the pseudo-inverse of the exact Hessian (its null space dropped)
    S = InfluenceFunction(model, solver="nystrom", n_components=p, random_state=0,
                          batch_size=37).fit(X, y).transform(Xq, yq)
    expected = _closed_form(model, X, y, Xq, yq)
    # the oracle's pinv (rcond 1e-12) and a cond ~1e5 Hessian: agreement to ~1e-8
    np.testing.assert_allclose(S, expected, rtol=0, atol=1e-8 * np.abs(expected).max())
    # damped: (H + lambda I)^{-1} exactly, as the explicit solver
    kw = dict(regularization=1e-3, batch_size=37)
    E = InfluenceFunction(model, solver="explicit", **kw).fit(X, y).transform(Xq, yq)
    N = InfluenceFunction(model, solver="nystrom", n_components=p, random_state=0, **kw)
    _close(N.fit(X, y).transform(Xq, yq), E, ulps=1e4)


def test_nystrom_error_decreases_with_the_rank(lr_digits):
    model, X, y, Xq, yq = lr_digits
    E = InfluenceFunction(model, solver="explicit", regularization=1e-2).fit(X, y)
    E = E.transform(Xq, yq)
    errors = []
    for k in (50, 200, 400, 600):
        S = InfluenceFunction(model, solver="nystrom", regularization=1e-2, n_components=k,
                              random_state=0).fit(X, y).transform(Xq, yq)
        errors.append(np.abs(S - E).max() / np.abs(E).max())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0], errors


def test_nystrom_is_exact_on_a_low_rank_curvature_with_its_woodbury_term():
    """A rank-r PSD matrix is recovered by an r-vector sketch; the inverse of A + lambda I
    then needs the (b - U^T U b) / lambda term on the complement of its range."""
    gen = torch.Generator().manual_seed(0)
    p, r, lam = 30, 6, 0.3
    V = torch.linalg.qr(torch.randn(p, r, generator=gen, dtype=torch.float64))[0]
    A = V @ torch.diag(torch.linspace(1.0, 9.0, r, dtype=torch.float64)) @ V.T
    B = torch.randn(5, p, generator=gen, dtype=torch.float64)
    expected = torch.linalg.solve(A + lam * torch.eye(p, dtype=torch.float64), B.T).T
    solver = NystromIHVP(damping=lam, n_components=r, random_state=1).fit(A)
    assert solver.complement_
    # the sketch's shift nu ~ sqrt(p) eps ||A|| is amplified by the condition of its
    # core W^T A W (~1e3 for 6 random directions in 30): ~1e5 round-offs
    _close(solver.solve(B).numpy(), expected.numpy(), ulps=1e5)
    # without damping the complement is dropped: the pseudo-inverse
    pinv = NystromIHVP(n_components=r, random_state=1).fit(A).solve(B)
    _close(pinv.numpy(), (torch.linalg.pinv(A, hermitian=True) @ B.T).T.numpy(), ulps=1e5)


@pytest.mark.parametrize("rank, k, l2_scale", [(6, 6, 1.0), (6, 10, 1.0), (12, 5, 1.0),
                                             (6, 6, 1e8)])
def test_nystrom_keeps_the_l2_term_exact(rank, k, l2_scale):
    """An operator with an uneven L2 term: only its data term is sketched and the inverse
    of ``A_k + diag(l2) + damping I`` comes by Woodbury with a diagonal. A sketch that
    holds the data term (k >= rank) gives the exact inverse, where sketching the whole
    operator would scale the rest by 1 / damping; a smaller one equals the dense inverse
    of its own approximation."""
    from skdattri.func.fisher import EmpiricalFisherOperator

    gen = torch.Generator().manual_seed(0)
    p, n, lam = 30, 40, 1e-3
    G = torch.randn(n, rank, generator=gen, dtype=torch.float64) @ torch.randn(
        rank, p, generator=gen, dtype=torch.float64)
    # l2_scale 1e8: the data term is sketched from the operator's own product without
    # the L2 term, not from A v - l2 v, whose cancellation would swamp it
    l2 = (torch.rand(p, generator=gen, dtype=torch.float64) + 0.5) * l2_scale
    l2[:4] = 0.0  # unpenalised entries: the damping alone keeps D positive there
    op = EmpiricalFisherOperator(G, l2=l2)
    B = torch.randn(5, p, generator=gen, dtype=torch.float64)
    D = l2 + lam
    solver = NystromIHVP(damping=lam, n_components=k, random_state=1).fit(op)
    _close(solver.diagonal_.numpy(), D.numpy(), ulps=4)
    U, s = solver.eigenvectors_, solver.eigenvalues_
    if k >= rank:
        A = G.T @ G / n + torch.diag(D)
        expected = torch.linalg.solve(A, B.T).T
        assert U.shape[0] == rank  # the null space of the data term dropped
    else:
        expected = torch.linalg.solve(U.T @ torch.diag(s) @ U + torch.diag(D), B.T).T
    _close(solver.solve(B).numpy(), expected.numpy(), ulps=1e7)
    _close(solver.solve(B[0]).numpy(), expected[0].numpy(), ulps=1e7)
    # no damping and unpenalised entries: D is not invertible, the whole operator is
    # sketched as before
    assert NystromIHVP(n_components=k, random_state=1).fit(op).diagonal_ is None


def test_nystrom_refuses_an_indefinite_curvature():
    A = torch.diag(torch.tensor([2.0, -1.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="positive semi-definite.*hessian='ggn'"):
        NystromIHVP(damping=0.1, n_components=3, random_state=0).fit(A)


# ----------------------------------------------------------------------------- diagonal


@pytest.mark.parametrize("regularization", [1e-3, None])
def test_diagonal_equals_the_hand_written_diagonal_reference(lr_digits, regularization):
    model, X, y, Xq, yq = lr_digits
    G, _ = _lr_grads(model, X, y)
    Q, _ = _lr_grads(model, Xq, yq)
    d = (G**2).mean(0) + _lr_l2(model, len(X)) + (regularization or 0.0)
    inverse = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0)  # unused pixels: 0
    expected = (Q * inverse) @ G.T
    for bs in (13, 200):
        attr = InfluenceFunction(model, solver="diagonal", fisher="empirical",
                                 regularization=regularization, batch_size=bs).fit(X, y)
        _close(attr.transform(Xq, yq), expected, ulps=1e3)
        _close(attr.self_influence(), ((G * inverse) * G).sum(1), ulps=1e3)


def test_diagonal_equals_explicit_fisher_when_the_fisher_is_diagonal(digits):
    """One-hot inputs into a bias-free linear layer: g_j = 2 (w_c - y_j) e_c, so the
    empirical Fisher is diagonal and the diagonal solver is exact."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, 60)
    X = np.eye(8)[labels]
    y = rng.normal(size=(60, 1))
    torch.manual_seed(0)
    net = nn.Linear(8, 1, bias=False).double()
    kw = dict(loss="mse", regularization=0.1, batch_size=7)
    E = InfluenceFunction(net, solver="explicit", hessian="fisher", **kw).fit(X, y)
    D = InfluenceFunction(net, solver="diagonal", fisher="empirical", **kw).fit(X, y)
    Xq, yq = np.eye(8)[[0, 3, 5]], rng.normal(size=(3, 1))
    _close(D.transform(Xq, yq), E.transform(Xq, yq), ulps=1e3)


def test_true_fisher_diagonal_is_an_unbiased_estimate_of_the_gauss_newton_diagonal(
        lr_digits):
    """Targets drawn from the model: the mean over draws approaches the exact GGN
    diagonal p_k (1 - p_k) x_i^2 (the empirical Fisher of a well-fitted model does not)."""
    model, X, y, _, _ = lr_digits
    _, P = _lr_grads(model, X, y)
    ggn = np.concatenate([((P * (1 - P))[:, :, None] * X[:, None, :] ** 2).mean(0).ravel(),
                          (P * (1 - P)).mean(0)])
    l2 = _lr_l2(model, len(X))
    draws = [InfluenceFunction(model, solver="diagonal", random_state=seed).fit(X, y)
             .solvers_[0].diagonal_.numpy() - l2 for seed in range(8)]
    mean = np.mean(draws, 0)
    assert abs(mean.sum() / ggn.sum() - 1) < 0.1
    assert np.abs(mean - ggn).sum() / ggn.sum() < 0.25
    G, _ = _lr_grads(model, X, y)
    assert np.abs((G**2).mean(0) - ggn).sum() / ggn.sum() > 0.5


def test_diagonal_kernels():
    G = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64)
    d = gradient_square_mean(G, batch_size=1)
    assert torch.equal(d, torch.tensor([5.0, 2.0, 0.0], dtype=torch.float64))
    x = DiagonalIHVP().fit(d).solve(torch.tensor([10.0, 4.0, 7.0], dtype=torch.float64))
    assert torch.equal(x, torch.tensor([2.0, 2.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="non-negative"):
        DiagonalIHVP().fit(-d)


# ----------------------------------------------------------------------------- K-FAC


def _kfac_reference(net, X, y, Xq, yq, damping):
    """(S (x) A + damping I)^{-1} for one nn.Linear under cross-entropy, built by hand:
    A = mean [x, 1][x, 1]^T, S = mean g g^T (g = softmax - onehot), in skdattri's flat
    layout (weight row-major, then bias); damping None: 0.1 x mean(s_o a_i)."""
    W = net.weight.detach().numpy()
    b = net.bias.detach().numpy()
    K, d = W.shape

    def grads(A, labels):
        z = A @ W.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(labels)), labels] -= 1.0
        return p

    g = grads(X, y)
    a = np.c_[X, np.ones(len(X))]
    A_cov, S_cov = a.T @ a / len(X), g.T @ g / len(X)
    if damping is None:
        damping = 0.1 * np.trace(S_cov) * np.trace(A_cov) / (K * (d + 1))
    F = np.kron(S_cov, A_cov)  # index o * (d + 1) + i: weight (o, i), bias i = d
    layer = np.arange(K * (d + 1)).reshape(K, d + 1)
    order = np.r_[layer[:, :d].ravel(), layer[:, d]]  # flat layout -> layer layout
    inv = np.linalg.inv(F + damping * np.eye(len(F)))[np.ix_(order, order)]

    def flat(A, labels):
        r = grads(A, labels)
        return np.c_[(r[:, :, None] * A[:, None, :]).reshape(len(A), -1), r]

    return flat(Xq, yq) @ inv @ flat(X, y).T


@pytest.mark.parametrize("regularization", [1e-2, None])
def test_kfac_equals_the_hand_built_kronecker_inverse(digits, regularization):
    X, y, Xq, yq = digits
    X, y, Xq, yq = X[:120], y[:120], Xq[:6], yq[:6]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 10)).double()
    expected = _kfac_reference(net[0], X, y, Xq, yq, regularization)
    attr = InfluenceFunction(net, loss="cross_entropy", solver="kfac", fisher="empirical",
                             regularization=regularization, batch_size=37).fit(X, y)
    assert not attr.solvers_[0].factors_.corrected
    # an eigendecomposition of S (x) A + damping (cond ~1e3): ~1e5 round-offs
    _close(attr.transform(Xq, yq), expected, ulps=1e5)


def test_kfac_equals_ekfac_when_the_correction_is_exact(digits):
    """One sample: A (x) S = vec(G) vec(G)^T is the exact Fisher, and its eigenvalues in
    the Kronecker basis are the EK-FAC ones."""
    X, y, Xq, yq = digits
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10)).double()
    batch = [(torch.as_tensor(X[:1]), torch.as_tensor(y[:1]))]
    kfac = fit_ekfac(net, batch, fisher="empirical", correct_eigenvalues=False)
    ekfac = fit_ekfac(net, batch, fisher="empirical")
    for name in kfac.layers:
        top = float(ekfac.eigenvalues[name].max())
        _close(kfac.eigenvalues[name].numpy(), ekfac.eigenvalues[name].numpy(), ulps=1e3)
        assert top > 0
    kw = dict(loss="cross_entropy", fisher="empirical", regularization=1e-2)
    K = InfluenceFunction(net, solver="kfac", **kw).fit(X[:1], y[:1])
    E = InfluenceFunction(net, solver="ekfac", **kw).fit(X[:1], y[:1])
    _close(K.transform(Xq[:5], yq[:5]), E.transform(Xq[:5], yq[:5]), ulps=1e4)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("solver, extra", [
    ("nystrom", {"n_components": 30}),
    ("diagonal", {}),  # targets drawn on the device (true Fisher)
    ("kfac", {"fisher": "empirical"}),
])
def test_new_solvers_on_cuda_match_cpu_and_pickle(lr_digits, solver, extra):
    import pickle

    model, X, y, Xq, yq = lr_digits
    kw = dict(solver=solver, regularization=1e-3, random_state=0, **extra)
    cpu = InfluenceFunction(model, device="cpu", **kw).fit(X, y)
    gpu = InfluenceFunction(model, device="cuda", **kw).fit(X, y)
    S_cpu, S_gpu = cpu.transform(Xq, yq), gpu.transform(Xq, yq)
    if solver == "diagonal":  # CUDA draws other targets than the CPU generator
        assert np.all(np.isfinite(S_gpu)) and S_gpu.shape == S_cpu.shape
    else:
        np.testing.assert_allclose(S_gpu, S_cpu, rtol=0, atol=1e-9 * np.abs(S_cpu).max())
    loaded = pickle.loads(pickle.dumps(gpu))
    assert loaded.device_.type == "cuda"
    _close(loaded.transform(Xq, yq), S_gpu, ulps=10)
