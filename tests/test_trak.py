"""TRAK: float64 reference formula, projections, ensembles, LDS, contract."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neural_network import MLPClassifier

from skdattri.estimator_checks import assert_scores_close, check_attributor
from skdattri.trak import TRAK


# ----------------------------------------------------------------------------- reference
def _np_params(module):
    return {k: v.detach().cpu().numpy().astype(np.float64) for k, v in module.items()}


def _reference_grads(P, X, y, value):
    """Per-sample gradients of the conftest MLP (tanh, 64-16-10), one sample at a time.

    value: "margin" = log p_y - log(1 - p_y); "neg_loss" = log p_y. Flattened as the
    module's parameters: hidden.weight, hidden.bias, out.weight, out.bias.
    """
    W1, b1, W2, b2 = P["hidden.weight"], P["hidden.bias"], P["out.weight"], P["out.bias"]
    rows = []
    for x, t in zip(X, y):
        h = np.tanh(W1 @ x + b1)
        z = W2 @ h + b2
        e = np.exp(z - z.max())
        if value == "margin":  # d/dz [z_t - logsumexp_{k != t} z_k]
            others = e.copy()
            others[t] = 0.0
            dz = -others / others.sum()
        else:  # d/dz log softmax(z)_t
            dz = -e / e.sum()
        dz[t] += 1.0
        da = (W2.T @ dz) * (1.0 - h**2)
        rows.append(np.concatenate([np.outer(da, x).ravel(), da, np.outer(dz, h).ravel(), dz]))
    return np.array(rows)


def _reference_one_minus_p(P, X, y):
    h = np.tanh(X @ P["hidden.weight"].T + P["hidden.bias"])
    z = h @ P["out.weight"].T + P["out.bias"]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return 1.0 - p[np.arange(len(y)), y]


def _reference_trak(members, projections, X, y, Xq, yq, lam, value, columns):
    """The TRAK formula with explicit numpy: average of per-model
    phi_q (Phi^T Phi + lam I)^{-1} Phi^T, times the average of the (1 - p) weights."""
    total, q_total = 0.0, 0.0
    for P, R in zip(members, projections):
        Phi = _reference_grads(P, X, y, "margin")[:, columns] @ R
        phi_q = _reference_grads(P, Xq, yq, value)[:, columns] @ R
        K = Phi.T @ Phi + lam * np.eye(R.shape[1])
        total = total + phi_q @ np.linalg.solve(K, Phi.T)
        q_total = q_total + _reference_one_minus_p(P, X, y)
    M = len(members)
    return (total / M) * (q_total / M)[None, :]


@pytest.mark.parametrize("target, layers, lam", [
    ("margin", None, 0.0),
    ("loss", None, 0.3),
    ("margin", "out", 0.3),
])
def test_matches_float64_reference(digits, make_mlp, target, layers, lam):
    X, y, Xq, yq = digits
    X, y = X[:120], y[:120]
    mods = [make_mlp(seed=s) for s in (0, 1)]
    states = [m.state_dict() for m in mods]
    attr = TRAK(mods[0], loss="cross_entropy", checkpoints=states, proj_dim=24,
                proj_type="gaussian", regularization=lam, target=target, layers=layers,
                random_state=7, batch_size=37).fit(X, y)
    assert attr.n_models_ == 2
    # projection matrices: the identity through each model's own projector
    p = sum(v.numel() for k, v in states[0].items() if layers is None or k.startswith(layers))
    R = [proj(torch.eye(p, dtype=torch.float64)).numpy() for proj in attr.projectors_]
    assert not np.allclose(R[0], R[1])  # one independent projection per model
    columns = np.arange(1210) if layers is None else np.arange(1040, 1210)
    value = "margin" if target == "margin" else "neg_loss"
    members = [_np_params(s) for s in states]
    expected = _reference_trak(members, R, X, y, Xq, yq, lam, value, columns)
    S = attr.transform(Xq, yq)
    np.testing.assert_allclose(S, expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())
    train_expected = _reference_trak(members, R, X, y, X, y, lam, value, columns)
    assert_scores_close(attr.self_influence(), np.diag(train_expected), rtol=1e-8)
    assert_scores_close(attr.train_weights_.numpy(),
                        np.mean([_reference_one_minus_p(P, X, y) for P in members], 0))


@pytest.mark.parametrize("proj_type", ["rademacher", "gaussian"])
def test_gradient_row_blocks_match_float64_reference(digits, make_mlp, proj_type,
                                                     monkeypatch):
    """Projected gradients computed 5 rows at a time (a byte budget below one row) inside
    batches of 37: the scores still equal the explicit formula, with the (packed, for
    Rademacher) projection read back through the identity."""
    from skdattri import _features

    monkeypatch.setattr(_features, "_FUSED_BYTES", 1)
    monkeypatch.setattr(_features, "_MIN_FUSED_ROWS", 5)
    seen = []
    grads = _features._GradientFeatures._grads

    def spy(self, params, X, y, what, out=None):
        G = grads(self, params, X, y, what, out=out)
        seen.append(G.shape[0])
        return G

    monkeypatch.setattr(_features._GradientFeatures, "_grads", spy)
    X, y, Xq, yq = digits
    X, y = X[:120], y[:120]
    mods = [make_mlp(seed=s) for s in (0, 1)]
    states = [m.state_dict() for m in mods]
    attr = TRAK(mods[0], loss="cross_entropy", checkpoints=states, proj_dim=70,
                proj_type=proj_type, regularization=0.3, random_state=3,
                batch_size=37).fit(X, y)
    assert max(seen) == 5 and sum(seen) == 2 * 120  # both models, in blocks of <= 5 rows
    R = [proj(torch.eye(1210, dtype=torch.float64)).numpy() for proj in attr.projectors_]
    if proj_type == "rademacher":
        np.testing.assert_array_equal(np.abs(R[0]), 1 / np.sqrt(70))
    members = [_np_params(s) for s in states]
    expected = _reference_trak(members, R, X, y, Xq, yq, 0.3, "margin", np.arange(1210))
    S = attr.transform(Xq, yq)
    np.testing.assert_allclose(S, expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())
    # the default budget (one block per batch) gives the same scores
    monkeypatch.setattr(_features, "_FUSED_BYTES", 2**22)
    whole = clone(attr).fit(X, y).transform(Xq, yq)
    assert_scores_close(whole, S)


def _binary_data():
    rng = np.random.RandomState(0)
    X = rng.randn(240, 12)
    y = (X @ rng.randn(12) + rng.randn(240) > 0).astype(int)
    return X[:200], y[:200], X[200:], y[200:]


def test_projection_is_exact_at_full_rank_and_refused_beyond():
    """proj_dim = n_params: an invertible projection cancels out of the unregularised
    formula exactly; more coordinates than parameters add nothing: a warning, and the
    full gradients are used (before issue 10 they were projected, for minutes at
    proj_dim=10**6)."""
    X, y, Xq, yq = _binary_data()
    model = LogisticRegression().fit(X, y)  # 13 parameters
    exact = TRAK(model, proj_dim=None, regularization=0.0).fit(X, y).transform(Xq, yq)
    for proj_type in ("gaussian", "rademacher"):
        S = TRAK(model, proj_dim=13, proj_type=proj_type, regularization=0.0,
                 random_state=0).fit(X, y)
        np.testing.assert_allclose(S.transform(Xq, yq), exact, rtol=1e-8,
                                   atol=1e-10 * np.abs(exact).max())
    unprojected = TRAK(model, proj_dim=None).fit(X, y)
    for k in (14, 10**6):
        with pytest.warns(UserWarning, match=f"proj_dim={k} exceeds the number of gradient "
                                             r"coordinates \(13\).*full gradients"):
            attr = TRAK(model, proj_dim=k, random_state=0).fit(X, y)
        assert attr.proj_dim_ is None and attr.projectors_ == [None]
        np.testing.assert_array_equal(attr.transform(Xq, yq), unprojected.transform(Xq, yq))


def test_singular_kernel_message(digits):
    X, y, _, _ = digits
    model = LogisticRegression(max_iter=500).fit(X, y)
    with pytest.raises(ValueError, match=r"singular \(numerical rank 200\).*regularization"):
        TRAK(model, proj_dim=512, regularization=0.0, random_state=0).fit(X, y)
    TRAK(model, proj_dim=512, regularization=1e-2, random_state=0).fit(X, y)


def test_ensemble_averages_scores_and_weights(digits):
    """Checkpoints: mean of the per-model phi K^-1 Phi^T, times the mean (1 - p)."""
    X, y, Xq, yq = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ckpts = [LogisticRegression(C=C, max_iter=it).fit(X, y)
                 for C, it in ((1.0, 5), (0.3, 30), (3.0, 200))]
    kw = dict(proj_dim=None, regularization=0.1)
    singles = [TRAK(c, **kw).fit(X, y) for c in ckpts]
    kernel_part = np.mean([a.transform(Xq, yq) / a.train_weights_.numpy() for a in singles], 0)
    q_mean = np.mean([a.train_weights_.numpy() for a in singles], 0)
    ens = TRAK(ckpts[-1], checkpoints=ckpts, **kw).fit(X, y)
    assert_scores_close(ens.transform(Xq, yq), kernel_part * q_mean)
    assert ens.estimators_ is None and ens.n_models_ == 3
    # state dicts give the same
    states = [{"linear.weight": torch.tensor(c.coef_), "linear.bias": torch.tensor(c.intercept_)}
              for c in ckpts]
    ens2 = TRAK(ckpts[-1], checkpoints=states, **kw).fit(X, y)
    assert_scores_close(ens2.transform(Xq, yq), ens.transform(Xq, yq))


def test_sign_duplicate_is_top_helpful(digits):
    """A training copy of a query helps it most, for the margin and for the loss."""
    X, y, Xq, yq = digits
    for i in range(5):
        Xa, ya = np.vstack([X, Xq[i:i + 1]]), np.append(y, yq[i])
        model = LogisticRegression(max_iter=1000).fit(Xa, ya)
        for target in ("margin", "loss"):
            S = TRAK(model, target=target, proj_dim=128, regularization=1e-2,
                     random_state=0).fit(Xa, ya).transform(Xq[i:i + 1], yq[i:i + 1])[0]
            assert S[-1] > 0
            assert S[-1] == S.max()


def test_regression_reweights_by_residual():
    rng = np.random.RandomState(0)
    X = rng.randn(50, 4)
    y = X @ [1.0, -2.0, 0.5, 0.0] + 0.3 * rng.randn(50)
    model = Ridge(alpha=1.0).fit(X[:40], y[:40])
    S = TRAK(model, proj_dim=None, regularization=0.0).fit(X[:40], y[:40]).transform(X[40:],
                                                                                    y[40:])
    Xa = np.c_[X, np.ones(50)]
    residual = y[:40] - model.predict(X[:40])  # -d/df (f - y)^2 = 2 (y - f)
    expected = Xa[40:] @ np.linalg.solve(Xa[:40].T @ Xa[:40], Xa[:40].T) * (2 * residual)
    assert_scores_close(S, expected, rtol=1e-9)


def test_n_models_needs_an_unfitted_estimator(digits):
    X, y, _, _ = digits
    fitted = LogisticRegression(max_iter=300).fit(X, y)
    with pytest.raises(ValueError, match="the estimator is already fitted"):
        TRAK(fitted, n_models=3).fit(X, y)
    with pytest.raises(ValueError, match="leave n_models=1"):
        TRAK(LogisticRegression(), n_models=2, checkpoints=[fitted]).fit(X, y)
    with pytest.raises(ValueError, match="n_models"):
        TRAK(LogisticRegression(), n_models=0).fit(X, y)


def test_lds_rises_with_ensemble_size():
    """TRAK-5 beats TRAK-1 on a digits MLP (LDS on the margin, 30 retrained subsets).

    With the default regularization ("auto", issue 10), measured over 2 data seeds x 2
    projection seeds: TRAK-1 0.82-0.85, TRAK-5 0.88-0.91 (gain 0.05-0.07). Without
    regularization (the default before): TRAK-1 0.16-0.18, TRAK-5 0.27-0.33.
    """
    from skdattri.datasets import load_setting
    from skdattri.ground_truth import lds_ground_truth
    from skdattri.metrics import lds_score

    s = load_setting("digits-mlp", n_train=200, n_test=50, random_state=0)
    net = s.estimator.set_params(max_epochs=20)
    gt = lds_ground_truth(net, s.X_train, s.y_train, s.X_test, s.y_test, n_subsets=30,
                          target="margin", random_state=0)
    five = TRAK(net, n_models=5, proj_dim=128, random_state=0).fit(s.X_train, s.y_train)
    one = TRAK(net, n_models=1, proj_dim=128, random_state=0).fit(s.X_train, s.y_train)
    # the first member is trained as every attributor trains an unfitted model
    first = [p.detach() for p in five.estimators_[0].module_.parameters()]
    assert all(torch.equal(a, b.detach()) for a, b in
               zip(first, one.estimator_.module_.parameters()))
    # ... and the others from their own seeds (module__random_state included)
    inits = {m.get_params()["module__random_state"] for m in five.estimators_}
    assert len(inits) == 5 and five.n_models_ == 5 and len(five.estimators_) == 5
    lds_one = lds_score(gt, one.transform(s.X_test, s.y_test))
    lds_five = lds_score(gt, five.transform(s.X_test, s.y_test))
    assert lds_one > 0.6, lds_one
    assert lds_five > lds_one + 0.025, (lds_one, lds_five)



# ----------------------------------------------------------------------------- defaults
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_defaults_fit_a_small_model():
    """Breast cancer LR (31 parameters, unscaled features): the defaults keep the full
    gradients and regularise, where proj_dim=512 without regularization used to raise
    "kernel singular"."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    model = LogisticRegression().fit(X, y)
    attr = TRAK(model).fit(X, y)
    assert attr.proj_dim_ is None and attr.regularization_.shape == (1,)
    assert attr.regularization_[0] > 0
    S = attr.transform(X[:25], y[:25])
    assert S.shape == (25, len(y)) and np.isfinite(S).all()
    assert np.isfinite(attr.self_influence()).all()


def test_singular_kernel_suggests_a_regularization_that_works(digits):
    import re

    X, y, Xq, yq = digits
    model = LogisticRegression(max_iter=500).fit(X, y)
    with pytest.raises(ValueError, match="regularization='auto'") as info:
        TRAK(model, proj_dim=512, regularization=0.0, random_state=0).fit(X, y)
    suggested = float(re.search(r"here regularization=([0-9.e+-]+)", str(info.value)).group(1))
    attr = TRAK(model, proj_dim=512, regularization=suggested, random_state=0).fit(X, y)
    auto = TRAK(model, proj_dim=512, random_state=0).fit(X, y)
    assert_scores_close(auto.regularization_, [suggested], ulps=1e11)  # printed with 6 digits
    np.testing.assert_allclose(attr.transform(Xq, yq), auto.transform(Xq, yq), rtol=1e-5,
                               atol=1e-5 * np.abs(auto.transform(Xq, yq)).max())


class _ScaledLinear(torch.nn.Module):
    """``scale * linear(X)`` with the weights divided by ``scale``: the same outputs as
    the unscaled model, gradients ``scale`` times larger."""

    def __init__(self, coef, intercept, scale):
        super().__init__()
        self.scale = scale
        self.linear = torch.nn.Linear(coef.shape[1], coef.shape[0], dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(coef) / scale)
            self.linear.bias.copy_(torch.as_tensor(intercept) / scale)

    def forward(self, X):
        return self.scale * self.linear(X)


def test_auto_regularization_is_invariant_to_the_gradient_scale(digits):
    X, y, Xq, yq = digits
    lr = LogisticRegression(max_iter=1000).fit(X, y)
    one, big = (_ScaledLinear(lr.coef_, lr.intercept_, s) for s in (1.0, 1e3))
    kw = dict(loss="cross_entropy", random_state=0)
    ref = TRAK(one, **kw).fit(X, y)
    scaled = TRAK(big, **kw).fit(X, y)
    assert ref.proj_dim_ == 512  # 650 gradient coordinates
    assert_scores_close(scaled.regularization_, ref.regularization_ * 1e6, ulps=1e3)
    S = ref.transform(Xq, yq)
    assert_scores_close(scaled.transform(Xq, yq), S, ulps=1e3)
    # a fixed lambda is not: it regularises the scaled kernel a million times less
    fixed = [TRAK(m, regularization=float(ref.regularization_[0]), **kw).fit(X, y)
             for m in (one, big)]
    assert_scores_close(fixed[0].transform(Xq, yq), S, ulps=1e3)
    assert np.abs(fixed[1].transform(Xq, yq) - S).max() > 0.1 * np.abs(S).max()


def test_self_influence_flags_mislabelled_samples():
    """High self-influence = mislabelled on digits-lr-noisy (measured AUC 0.99 with 400
    samples, 40 flipped), and it is the diagonal of transform(X_train, y_train)."""
    from skdattri.datasets import load_setting
    from skdattri.metrics import mislabel_auc_score

    s = load_setting("digits-lr-noisy", n_train=400, n_test=10)
    model = s.estimator.fit(s.X_train, s.y_train)
    attr = TRAK(model, random_state=0).fit(s.X_train, s.y_train)
    self_inf = attr.self_influence()
    assert mislabel_auc_score(s.is_noisy, self_inf) > 0.9
    assert_scores_close(self_inf, np.diag(attr.transform(s.X_train, s.y_train)), ulps=1e3)


# ----------------------------------------------------------------------------- contract
def test_contract_checks_fitted_models(digits, skorch_net, make_mlp):
    X, y, Xq, yq = digits
    lr = LogisticRegression(max_iter=1000).fit(X, y)
    # the inverse of the 32 x 32 kernel amplifies round-off by its condition number (~1e4)
    check_attributor(TRAK(lr, proj_dim=32, regularization=1e-3, random_state=0),
                     X[:60], y[:60], Xq[:12], yq[:12], rtol=1e-10)
    check_attributor(TRAK(skorch_net, proj_dim=16, random_state=0), X[:40], y[:40], Xq[:9],
                     yq[:9])
    mods = [make_mlp(seed=s) for s in (0, 1)]
    check_attributor(TRAK(mods[0], loss="cross_entropy", target="loss", layers=["out"],
                          checkpoints=[m.state_dict() for m in mods], proj_dim=8,
                          proj_type="sjlt", random_state=0), X[:30], y[:30], Xq[:9], yq[:9])


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_contract_checks_trained_ensemble(digits):
    X, y, Xq, yq = digits
    mlp = MLPClassifier((8,), max_iter=30, random_state=0)
    S = check_attributor(TRAK(mlp, n_models=3, proj_dim=16, random_state=0),
                         X[:40], y[:40], Xq[:9], yq[:9])
    attr = TRAK(mlp, n_models=3, proj_dim=16, random_state=0).fit(X[:40], y[:40])
    assert_scores_close(attr.transform(Xq[:9], yq[:9]), S)
    seeds = [m.random_state for m in attr.estimators_]
    assert seeds[0] == 0 and len(set(seeds)) == 3  # the first is the user's model
    assert not np.allclose(attr.estimators_[0].coefs_[0], attr.estimators_[1].coefs_[0])
    assert not hasattr(mlp, "coefs_")  # the user's estimator is untouched
    assert clone(attr).estimator is not mlp  # an unfitted model is cloned, as in sklearn


def test_float32_model(digits, make_mlp):
    X, y, Xq, yq = digits
    m64 = make_mlp(dtype=torch.float64)
    m32 = make_mlp(dtype=torch.float64).float()
    attr = TRAK(m32, loss="cross_entropy", proj_dim=32, random_state=0).fit(X[:80], y[:80])
    S = attr.transform(Xq, yq)
    assert S.dtype == np.float32 and attr.train_features_[0].dtype == torch.float32
    ref = TRAK(m64, loss="cross_entropy", proj_dim=32,
               random_state=0).fit(X[:80], y[:80]).transform(Xq, yq)
    np.testing.assert_allclose(S, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())



# ----------------------------------------------------------------------------- dropout
class _DropoutMLP(torch.nn.Module):
    """64 -> 16 (tanh, dropout) -> 10, float64."""

    def __init__(self, p=0.5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = torch.nn.Linear(64, 16, dtype=torch.float64)
        self.drop = torch.nn.Dropout(p)
        self.out = torch.nn.Linear(16, 10, dtype=torch.float64)

    def forward(self, X):
        return self.out(self.drop(torch.tanh(self.hidden(X))))


def _dropout_trak(module, **kw):
    params = dict(loss="cross_entropy", proj_dim=32, regularization=0.1, random_state=0,
                  batch_size=37)
    return TRAK(module, dropout=True, **{**params, **kw})


def test_dropout_members_are_fixed_subnetworks(digits):
    """Member m's forward pass is the network with one fixed mask (the same for every
    sample, batch and engine); members differ from each other."""
    import numpy.random as npr

    from skdattri.model import DROPOUT_SEED

    X, y, Xq, yq = digits
    module = _DropoutMLP(p=0.5)
    attr = _dropout_trak(module, n_models=3).fit(X[:60], y[:60])
    assert attr.n_models_ == 3
    Xt = torch.as_tensor(Xq)
    h = torch.tanh(module.hidden(Xt))
    outs = []
    for member in attr._members_:
        seed = int(member[DROPOUT_SEED])
        keep = torch.as_tensor(npr.default_rng([seed, 0]).random(16) >= 0.5)
        expected = module.out(h * keep / 0.5)
        got = attr.model_.forward(member, Xt)
        assert_scores_close(got, expected, ulps=64)
        one = torch.cat([attr.model_.forward(member, Xt[i:i + 1]) for i in range(3)])
        assert_scores_close(one, got[:3], ulps=64)
        outs.append(got)
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    feats = [A[:] for A in attr.train_features_]
    assert not torch.allclose(feats[0], feats[1])


def test_dropout_ensemble_is_reproducible_and_batch_size_free(digits):
    X, y, Xq, yq = digits
    module = _DropoutMLP(p=0.3)
    S = _dropout_trak(module, n_models=3).fit(X[:80], y[:80]).transform(Xq, yq)
    assert np.all(np.isfinite(S)) and S.shape == (len(Xq), 80)
    again = _dropout_trak(module, n_models=3).fit(X[:80], y[:80]).transform(Xq, yq)
    np.testing.assert_array_equal(S, again)
    other = _dropout_trak(module, n_models=3, random_state=1).fit(X[:80], y[:80])
    assert not np.allclose(other.transform(Xq, yq), S)
    big = _dropout_trak(module, n_models=3, batch_size=500).fit(X[:80], y[:80])
    assert_scores_close(big.transform(Xq, yq), S)
    # the same masks in the hook engine (a batch) and in vmap (one sample at a time)
    from skdattri.func import model_per_sample_grads

    member, Xt, yt = big._members_[1], torch.as_tensor(Xq), torch.as_tensor(yq)
    hooks = model_per_sample_grads(big.model_, member, Xt, yt, "neg_margin",
                                   names=big.param_names_, engine="hooks")
    vmap = model_per_sample_grads(big.model_, member, Xt, yt, "neg_margin",
                                  names=big.param_names_, engine="vmap")
    torch.testing.assert_close(hooks, vmap, rtol=0, atol=256 * np.finfo(float).eps *
                               float(vmap.abs().max()))
    # a training copy of a query still helps it most, member by member
    attr = _dropout_trak(module, n_models=3, proj_dim=None).fit(X[:80], y[:80])
    S = attr.transform(X[:5], y[:5])
    assert np.all(S.argmax(1) == np.arange(5))


def test_dropout_with_p0_is_plain_trak(digits):
    X, y, Xq, yq = digits
    module = _DropoutMLP(p=0.0)
    plain = TRAK(module, loss="cross_entropy", proj_dim=32, regularization=0.1,
                 random_state=0).fit(X[:60], y[:60]).transform(Xq, yq)
    masked = _dropout_trak(module).fit(X[:60], y[:60]).transform(Xq, yq)
    assert_scores_close(masked, plain)
    states = [module.state_dict()] * 2  # dattri's way: one checkpoint repeated
    plain2 = TRAK(module, loss="cross_entropy", checkpoints=states, proj_dim=32,
                  regularization=0.1, random_state=0).fit(X[:60], y[:60]).transform(Xq, yq)
    masked2 = _dropout_trak(module, checkpoints=states).fit(X[:60], y[:60]).transform(Xq, yq)
    assert_scores_close(masked2, plain2)
    # with p > 0 the repeated checkpoints become different members
    drop = _DropoutMLP(p=0.5)
    ens = _dropout_trak(drop, checkpoints=[drop.state_dict()] * 2).fit(X[:60], y[:60])
    assert not torch.allclose(ens.train_features_[0][:], ens.train_features_[1][:])


def test_dropout_needs_dropout_layers(digits, make_mlp):
    X, y, _, _ = digits
    with pytest.raises(ValueError, match="dropout=True needs nn.Dropout layers"):
        _dropout_trak(make_mlp()).fit(X[:30], y[:30])
    with pytest.raises(ValueError, match="dropout=True for a dropout ensemble"):
        TRAK(_DropoutMLP(), loss="cross_entropy", n_models=2).fit(X[:30], y[:30])


def test_dropout_contract(digits):
    X, y, Xq, yq = digits
    check_attributor(_dropout_trak(_DropoutMLP(p=0.5), n_models=2, proj_dim=16),
                     X[:30], y[:30], Xq[:9], yq[:9])
