"""InfluenceFunction: closed-form oracle, exact leave-one-out, every solver, contract."""

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.neural_network import MLPClassifier
from torch import nn

from skdattri import InfluenceFunction, TracIn
from skdattri.estimator_checks import assert_scores_close, check_attributor
from skdattri.ground_truth import lds_ground_truth, loo_ground_truth
from skdattri.metrics import loo_score, make_lds_scorer
from skdattri.model_selection import TrainQuerySplit


def _row_spearman(S, E):
    return float(np.mean([spearmanr(a, b)[0] for a, b in zip(S, E)]))


@pytest.fixture(scope="module")
def lr_digits(digits):
    X, y, Xq, yq = digits
    model = LogisticRegression(C=1.0, tol=1e-10, max_iter=5000).fit(X, y)
    return model, X, y, Xq[:20], yq[:20]


def _closed_form(model, X, y, Xq, yq):
    """numpy oracle: g_q^T pinv(H) g_j with H the Hessian of the estimator's objective.

    Objective (sklearn): mean_i CE_i + ||W||^2 / (2 C n); the intercept is unpenalised, so
    H has a null direction (shifting every intercept equally); every gradient is orthogonal
    to it and the pseudo-inverse is the exact inverse on the gradients' span.
    """
    W, b = model.coef_, model.intercept_
    K, d = W.shape
    n = len(X)

    def grads(A, labels):
        z = A @ W.T + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        r = p.copy()
        r[np.arange(len(labels)), labels] -= 1.0
        return np.concatenate([(r[:, :, None] * A[:, None, :]).reshape(len(A), -1), r], 1), p

    G, P = grads(X, y)
    Q, _ = grads(Xq, yq)
    Xa = np.c_[X, np.ones(n)]
    H = np.zeros((K * (d + 1),) * 2)
    for i in range(n):
        H += np.kron(np.diag(P[i]) - np.outer(P[i], P[i]), np.outer(Xa[i], Xa[i]))
    H /= n
    order = np.r_[[k * (d + 1) + j for k in range(K) for j in range(d)],
                  [k * (d + 1) + d for k in range(K)]]
    H = H[np.ix_(order, order)]
    H[: K * d, : K * d] += np.eye(K * d) / (model.C * n)
    return Q @ np.linalg.pinv(H, rcond=1e-12, hermitian=True) @ G.T


def test_explicit_equals_closed_form_influence(lr_digits):
    model, X, y, Xq, yq = lr_digits
    expected = _closed_form(model, X, y, Xq, yq)
    S = InfluenceFunction(model, solver="explicit", batch_size=37).fit(X, y).transform(Xq, yq)
    assert S.dtype == np.float64
    np.testing.assert_allclose(S, expected, rtol=1e-8, atol=1e-8 * np.abs(expected).max())


def test_influence_predicts_exact_leave_one_out(lr_digits):
    model, X, y, Xq, yq = lr_digits
    removed = np.arange(100)
    gt = loo_ground_truth(LogisticRegression(C=1.0, tol=1e-10, max_iter=5000), X, y, Xq, yq,
                          indices=removed, n_jobs=1)
    S = InfluenceFunction(model, solver="explicit").fit(X, y).transform(Xq, yq)
    predicted = S[:, removed].T / len(X)  # first-order change of each query's loss
    assert pearsonr(predicted.ravel(), gt.values.ravel())[0] >= 0.95
    assert loo_score(gt, S) >= 0.95


@pytest.mark.parametrize("solver, kwargs, rtol", [
    ("cg", dict(tol=1e-10, max_iter=1000), 1e-6),
    ("arnoldi", dict(n_components=650, max_iter=650), 1e-6),
])
def test_iterative_solvers_agree_with_explicit(lr_digits, solver, kwargs, rtol):
    model, X, y, Xq, yq = lr_digits
    E = InfluenceFunction(model, solver="explicit").fit(X, y).transform(Xq, yq)
    S = InfluenceFunction(model, solver=solver, random_state=0, **kwargs).fit(X, y)
    np.testing.assert_allclose(S.transform(Xq, yq), E, rtol=rtol, atol=rtol * np.abs(E).max())


def test_lissa_agrees_with_explicit(digits):
    """LiSSA on a well-conditioned model (strong L2): Spearman >= 0.99 with explicit."""
    X, y, Xq, yq = digits
    model = LogisticRegression(C=0.05, tol=1e-10, max_iter=5000).fit(X[:100], y[:100])
    E = InfluenceFunction(model, solver="explicit").fit(X[:100], y[:100]).transform(Xq[:5],
                                                                                   yq[:5])
    S = InfluenceFunction(model, solver="lissa", depth=300, scale=5.0, n_samples=2,
                          batch_size=50, random_state=0).fit(X[:100], y[:100])
    S = S.transform(Xq[:5], yq[:5])
    assert spearmanr(S.ravel(), E.ravel())[0] >= 0.99
    np.testing.assert_allclose(S, E, rtol=0.1, atol=0.05 * np.abs(E).max())


def test_arnoldi_few_components_is_a_low_rank_approximation(lr_digits):
    model, X, y, Xq, yq = lr_digits
    E = InfluenceFunction(model, solver="explicit", regularization=0.1).fit(X, y)
    E = E.transform(Xq, yq)
    S = InfluenceFunction(model, solver="arnoldi", regularization=0.1, n_components=60,
                          max_iter=120, random_state=0).fit(X, y).transform(Xq, yq)
    assert _row_spearman(S, E) >= 0.9


@pytest.mark.parametrize("solver", ["explicit", "cg", "arnoldi", "nystrom", "datainf",
                                    "diagonal", "kfac", "ekfac"])
def test_batch_size_invariance(digits, solver):
    """The regression test for summing per-batch inverse Hessians: 1, 13 and all."""
    X, y, Xq, yq = digits
    model = LogisticRegression(C=0.5, max_iter=2000).fit(X[:60], y[:60])
    kw = dict(solver=solver, regularization=1e-2, random_state=0, fisher="empirical",
              tol=1e-12, max_iter=700, n_components=650)
    ref = InfluenceFunction(model, batch_size=60, **kw).fit(X[:60], y[:60])
    S_ref = ref.transform(Xq[:6], yq[:6])
    for bs in (1, 13):
        other = InfluenceFunction(model, batch_size=bs, **kw).fit(X[:60], y[:60])
        np.testing.assert_allclose(other.transform(Xq[:6], yq[:6]), S_ref, rtol=1e-7,
                                   atol=1e-9 * np.abs(S_ref).max())
        assert_scores_close(other.self_influence(), ref.self_influence(), rtol=1e-7)


@pytest.mark.parametrize("solver", ["explicit", "cg", "arnoldi", "nystrom", "datainf",
                                    "diagonal", "kfac", "ekfac"])
def test_contract(digits, solver):
    X, y, Xq, yq = digits
    model = LogisticRegression(C=0.5, max_iter=2000).fit(X[:40], y[:40])
    # CG is accurate to cond x tol, not to round-off
    check_attributor(InfluenceFunction(model, solver=solver, regularization=1e-2,
                                       random_state=0, fisher="empirical", n_components=100,
                                       max_iter=300, tol=1e-12),
                     X[:40], y[:40], Xq[:7], yq[:7], rtol=1e-8 if solver == "cg" else None,
                     batch_sizes=(7, None))


def test_ekfac_and_datainf_rank_agreement_on_small_mlp(digits):
    """Stated thresholds (damping 0.1 on the GGN): EK-FAC >= 0.55, DataInf >= 0.4 mean
    per-query Spearman with the explicit GGN influence; EK-FAC beats Grad-Dot.

    (Observed: EK-FAC 0.6-0.75, DataInf 0.47-0.68, Grad-Dot 0.47-0.68 on such MLPs;
    DataInf is close to a rescaled Grad-Dot on dense layers.)"""
    X, y, Xq, yq = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier(hidden_layer_sizes=(16,), alpha=1e-2, max_iter=300,
                            random_state=0).fit(X, y)
    E = InfluenceFunction(mlp, solver="explicit", hessian="ggn", regularization=0.1)
    E = E.fit(X, y).transform(Xq[:20], yq[:20])
    ek = InfluenceFunction(mlp, solver="ekfac", regularization=0.1, random_state=0)
    ek = ek.fit(X, y).transform(Xq[:20], yq[:20])
    di = InfluenceFunction(mlp, solver="datainf", regularization=0.1).fit(X, y)
    di = di.transform(Xq[:20], yq[:20])
    gd = TracIn(mlp).fit(X, y).transform(Xq[:20], yq[:20])
    assert _row_spearman(ek, E) >= 0.55
    assert _row_spearman(di, E) >= 0.4
    assert _row_spearman(ek, E) > _row_spearman(gd, E)


def test_ggn_equals_hessian_for_logistic_regression(lr_digits):
    model, X, y, Xq, yq = lr_digits
    E = InfluenceFunction(model, solver="explicit").fit(X, y).transform(Xq, yq)
    G = InfluenceFunction(model, solver="explicit", hessian="ggn").fit(X, y).transform(Xq, yq)
    np.testing.assert_allclose(G, E, rtol=1e-8, atol=1e-8 * np.abs(E).max())


def test_indefinite_hessian_gets_a_clear_error(digits):
    X, y, _, _ = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier(hidden_layer_sizes=(16,), alpha=1e-4, max_iter=200,
                            random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="not positive definite.*ggn"):
        InfluenceFunction(mlp, solver="explicit", hessian="exact", regularization=1e-4).fit(X, y)
    # the default curvature of a network is its Gauss-Newton matrix: no error
    auto = InfluenceFunction(mlp, solver="explicit", regularization=1e-4).fit(X, y)
    assert auto.hessian_ == "ggn"


def test_explicit_refuses_large_models(digits):
    X, y, _, _ = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier(hidden_layer_sizes=(200,), max_iter=5, random_state=0).fit(X, y)
    budget = 2**25  # 32 MiB: the 15,010-parameter model needs 1.7 GiB in float64
    with pytest.raises(ValueError, match="above max_memory=33554432 bytes.*Raise max_memory"):
        InfluenceFunction(mlp, solver="explicit", regularization=0.1, max_memory=budget).fit(X, y)
    # restricting the parameters with layers= brings it back within budget
    S = InfluenceFunction(mlp, solver="explicit", regularization=0.1, layers="output",
                          max_memory=budget)
    assert S.fit(X, y).transform(X[:3], y[:3]).shape == (3, len(X))


def test_cg_warns_at_max_iter(lr_digits):
    model, X, y, Xq, yq = lr_digits
    # tol beyond float64 rounding: not even the preconditioned recursion reaches it
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        InfluenceFunction(model, solver="cg", max_iter=2, tol=1e-30).fit(X, y).transform(Xq, yq)


def test_relatif_normalisation(lr_digits):
    model, X, y, Xq, yq = lr_digits
    plain = InfluenceFunction(model, solver="explicit").fit(X, y)
    rel = InfluenceFunction(model, solver="explicit", normalize=True).fit(X, y)
    s = plain.self_influence()
    assert_scores_close(rel.transform(Xq, yq), plain.transform(Xq, yq) / np.sqrt(s), rtol=1e-10)
    assert_scores_close(rel.self_influence(), np.sqrt(s), rtol=1e-10)


def test_checkpoints_are_averaged(digits):
    X, y, Xq, yq = digits
    members = [LogisticRegression(C=c, max_iter=3000).fit(X[:80], y[:80]) for c in (0.3, 1.0)]
    avg = InfluenceFunction(members[0], solver="explicit", checkpoints=members).fit(X[:80],
                                                                                   y[:80])
    parts = [InfluenceFunction(m, solver="explicit").fit(X[:80], y[:80]).transform(Xq, yq)
             for m in members]
    # both checkpoints share the first member's L2 penalty (the estimator being explained)
    parts[1] = InfluenceFunction(members[0], solver="explicit",
                                 checkpoints=[members[1]]).fit(X[:80], y[:80]).transform(Xq,
                                                                                         yq)
    assert_scores_close(avg.transform(Xq, yq), (parts[0] + parts[1]) / 2, rtol=1e-10)


@pytest.mark.parametrize("solver", ["explicit", "cg", "lissa", "arnoldi", "nystrom", "datainf",
                                    "diagonal", "kfac", "ekfac"])
def test_every_solver_on_skorch_sklearn_mlp_and_module(digits, skorch_net, make_mlp, solver):
    X, y, Xq, yq = digits
    X, y = X[:50], y[:50]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier(hidden_layer_sizes=(8,), max_iter=50, random_state=0).fit(X, y)
    kw = dict(solver=solver, regularization=0.1, hessian="ggn", max_iter=50, depth=50,
              n_components=20, random_state=0, tol=1e-6)
    for est, extra in ((skorch_net, {}), (mlp, {}),
                       (make_mlp(), dict(loss="cross_entropy", layers="out"))):
        attr = InfluenceFunction(est, **kw, **extra).fit(X, y)
        S = attr.transform(Xq[:4], yq[:4])
        assert S.shape == (4, 50) and np.all(np.isfinite(S))
        if "layers" in extra and solver not in ("kfac", "ekfac"):
            assert attr.param_names_ == ["out.weight", "out.bias"]


def test_ekfac_on_conv_net_skips_nothing_it_can_factor(digits):
    X, y, Xq, yq = digits

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, dtype=torch.float64)
            self.norm = nn.LayerNorm(4 * 6 * 6, dtype=torch.float64)
            self.fc = nn.Linear(4 * 6 * 6, 10, dtype=torch.float64)

        def forward(self, X):
            h = torch.relu(self.conv(X.reshape(-1, 1, 8, 8))).flatten(1)
            return self.fc(self.norm(h))

    torch.manual_seed(0)
    attr = InfluenceFunction(Conv(), solver="ekfac", loss="cross_entropy",
                             random_state=0).fit(X[:40], y[:40])
    assert attr.param_names_ == ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    assert attr.transform(Xq[:3], yq[:3]).shape == (3, 40)


def test_grid_search_over_solver_and_regularization(digits):
    X, y, Xq, yq = digits
    X, y, Xq, yq = X[:80], y[:80], Xq[:10], yq[:10]
    est = LogisticRegression(C=1.0, max_iter=2000)
    gt = lds_ground_truth(est, X, y, Xq, yq, n_subsets=20, random_state=0)
    model = LogisticRegression(C=1.0, max_iter=2000).fit(X, y)
    grid = {"solver": ["explicit", "cg"], "regularization": [None, 1.0]}
    search = GridSearchCV(InfluenceFunction(model), grid, scoring=make_lds_scorer(gt),
                          cv=TrainQuerySplit(n_train=len(X)), refit=False)
    search.fit(np.concatenate([X, Xq]), np.concatenate([y, yq]))
    scores = search.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores))
    from skdattri.metrics import lds_score

    for params, got in zip(search.cv_results_["params"], scores):
        S = InfluenceFunction(model, **params).fit(X, y).transform(Xq, yq)
        assert got == pytest.approx(lds_score(gt, S), abs=1e-6)


# (Nystrom does not form it: its k products cost less, and the L2 term stays known)
@pytest.mark.parametrize("solver, kw", [("cg", dict(max_iter=30, tol=1e-10)),
                                        ("arnoldi", dict(n_components=40, max_iter=60))])
@pytest.mark.parametrize("hessian", ["exact", "fisher"])
def test_small_closed_form_curvature_is_formed_once_with_the_same_scores(
        lr_digits, monkeypatch, solver, kw, hessian):
    """A linear model's (or the empirical Fisher's) curvature small enough to hold is
    formed once for the iterative solvers: the same scores as the per-sample products."""
    from skdattri import _solvers
    from skdattri.func.hessian import DenseOperator

    model, X, y, Xq, yq = lr_digits
    make = lambda: InfluenceFunction(model, solver=solver, hessian=hessian,  # noqa: E731
                                     regularization=1e-2, random_state=0, **kw)
    formed = []
    dense = _solvers._FitContext.operator

    def spy(self, *args, **kwargs):
        op = dense(self, *args, **kwargs)
        formed.append(isinstance(op, DenseOperator))
        return op

    monkeypatch.setattr(_solvers._FitContext, "operator", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fast = make().fit(X, y).transform(Xq, yq)
        assert formed == [True]
        monkeypatch.setattr(_solvers, "_DENSE_OPERATOR_BYTES", 0)
        slow = make().fit(X, y).transform(Xq, yq)
    assert formed == [True, False]
    # the same Krylov iterations on the same matrix, products rounded differently
    assert_scores_close(fast, slow, rtol=1e-8)
