"""TracIn / Grad-Dot / Grad-Cos: formula, sign, checkpoints, contract."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from skdattri import TracIn, config_context
from skdattri.estimator_checks import assert_scores_close, check_attributor


@pytest.fixture(scope="module")
def lr_model(digits):
    X, y, _, _ = digits
    return LogisticRegression(C=1.0, max_iter=1000).fit(X, y)


def _manual_grads(W, b, X, y):
    """Per-sample CE gradients of a linear model, in closed form (numpy)."""
    z = X @ W.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = p.copy()
    d[np.arange(len(y)), y] -= 1.0
    return np.concatenate([(d[:, :, None] * X[:, None, :]).reshape(len(X), -1), d], 1)


def test_contract_checks_fitted_logistic(digits, lr_model):
    X, y, Xq, yq = digits
    check_attributor(TracIn(lr_model), X[:60], y[:60], Xq[:12], yq[:12])


def test_contract_checks_skorch_and_module(digits, skorch_net, make_mlp):
    X, y, Xq, yq = digits
    check_attributor(TracIn(skorch_net), X[:30], y[:30], Xq[:9], yq[:9])
    check_attributor(TracIn(make_mlp(), loss="cross_entropy", target="margin"),
                     X[:30], y[:30], Xq[:9], yq[:9])


@pytest.mark.parametrize("ghost", [True, False])
def test_grad_dot_equals_closed_form(digits, lr_model, ghost):
    X, y, Xq, yq = digits
    G = _manual_grads(lr_model.coef_, lr_model.intercept_, X, y)
    Q = _manual_grads(lr_model.coef_, lr_model.intercept_, Xq, yq)
    with config_context(ghost=ghost):  # layer factors (ghost products) or gradients
        attr = TracIn(lr_model, batch_size=13).fit(X, y)
    assert (attr.ghost_layout_ is not None) is ghost
    assert_scores_close(attr.transform(Xq, yq), Q @ G.T)
    assert_scores_close(attr.self_influence(), (G * G).sum(1))


@pytest.mark.parametrize("ghost", [True, False])
def test_grad_cos(digits, lr_model, ghost):
    X, y, Xq, yq = digits
    G = _manual_grads(lr_model.coef_, lr_model.intercept_, X, y)
    Q = _manual_grads(lr_model.coef_, lr_model.intercept_, Xq, yq)
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    with config_context(ghost=ghost):
        attr = TracIn(lr_model, normalize=True).fit(X, y)
    S = attr.transform(Xq, yq)
    assert_scores_close(S, Q @ G.T)
    assert np.all(np.abs(S) <= 1 + 1e-12)
    np.testing.assert_allclose(attr.self_influence(), 1.0)


def test_tracincp_sums_checkpoints_weighted_by_learning_rates(digits):
    X, y, Xq, yq = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # early checkpoints
        ckpts = [LogisticRegression(max_iter=it).fit(X, y) for it in (2, 5, 50)]
    lrs = [0.5, 0.25, 0.125]
    expected = sum(
        lr * _manual_grads(c.coef_, c.intercept_, Xq, yq)
        @ _manual_grads(c.coef_, c.intercept_, X, y).T
        for lr, c in zip(lrs, ckpts)
    )
    # checkpoints as fitted estimators
    attr = TracIn(ckpts[-1], checkpoints=ckpts, learning_rates=lrs).fit(X, y)
    assert_scores_close(attr.transform(Xq, yq), expected)
    # ... and as state dicts
    states = [{"linear.weight": torch.tensor(c.coef_), "linear.bias": torch.tensor(c.intercept_)}
              for c in ckpts]
    attr2 = TracIn(ckpts[-1], checkpoints=states, learning_rates=lrs).fit(X, y)
    assert_scores_close(attr2.transform(Xq, yq), expected)
    with pytest.raises(ValueError, match="learning_rates has 2 values for 3 checkpoints"):
        TracIn(ckpts[-1], checkpoints=ckpts, learning_rates=[1.0, 2.0]).fit(X, y)


def test_torch_checkpoints_state_dicts(digits, make_mlp):
    X, y, Xq, yq = digits
    mods = [make_mlp(seed=s) for s in range(3)]
    attr = TracIn(mods[0], loss="cross_entropy",
                  checkpoints=[m.state_dict() for m in mods]).fit(X[:50], y[:50])
    parts = [TracIn(m, loss="cross_entropy").fit(X[:50], y[:50]).transform(Xq, yq)
             for m in mods]
    assert_scores_close(attr.transform(Xq, yq), sum(parts))
    bad = make_mlp(n_hidden=5).state_dict()
    with pytest.raises(ValueError, match="has shape"):
        TracIn(mods[0], loss="cross_entropy", checkpoints=[bad]).fit(X[:50], y[:50])


def test_sign_duplicate_is_top_helpful(digits):
    """A training copy of a query is among its most helpful samples.

    Grad-Dot / TracIn: for the queries the model finds hard (highest loss), the copy
    ranks in the top 3 (on easy queries Grad-Dot is dominated by high-gradient-norm
    samples, a known property of the method). Grad-Cos: the copy ranks first always.
    """
    X, y, Xq, yq = digits
    base = LogisticRegression(max_iter=1000).fit(X, y)
    loss = -np.log(base.predict_proba(Xq)[np.arange(len(yq)), yq])
    hard = np.argsort(-loss)[:8]
    ranks, cos_ranks = [], []
    for i in np.unique(np.r_[hard, np.arange(8)]):
        Xa = np.vstack([X, Xq[i:i + 1]])
        ya = np.append(y, yq[i])
        model = LogisticRegression(max_iter=1000).fit(Xa, ya)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            ckpts = [LogisticRegression(max_iter=it).fit(Xa, ya) for it in (3, 10)] + [model]
        q = (Xq[i:i + 1], yq[i:i + 1])
        if i in hard:
            for attr in (TracIn(model), TracIn(model, checkpoints=ckpts)):
                S = attr.fit(Xa, ya).transform(*q)[0]
                assert S[-1] > 0
                ranks.append(int((S > S[-1]).sum()))
        S = TracIn(model, normalize=True).fit(Xa, ya).transform(*q)[0]
        cos_ranks.append(int((S > S[-1]).sum()))
    assert max(ranks) <= 2, ranks
    assert max(cos_ranks) == 0, cos_ranks


def test_transform_without_y_uses_predictions(digits, lr_model, skorch_net):
    X, y, Xq, _ = digits
    for model in (lr_model, skorch_net):
        attr = TracIn(model).fit(X[:50], y[:50])
        assert_scores_close(attr.transform(Xq), attr.transform(Xq, model.predict(Xq)))


def test_regression_without_y_explains_the_prediction():
    rng = np.random.RandomState(0)
    X = rng.randn(40, 3)
    y = X @ [1.0, -2.0, 0.5] + 0.1 * rng.randn(40)
    ridge = Ridge(alpha=1.0).fit(X, y)
    S = TracIn(ridge).fit(X, y).transform(X[:5])
    # neg-output gradient of query . loss gradient of train: -[x_q, 1] . 2 (f_j - y_j) [x_j, 1]
    Xa = np.c_[X, np.ones(40)]
    expected = -(Xa[:5] @ (2 * (ridge.predict(X) - y)[:, None] * Xa).T)
    assert_scores_close(S, expected)


def test_margin_target_and_callable_target(digits, lr_model):
    X, y, Xq, yq = digits
    S_m = TracIn(lr_model, target="margin").fit(X, y).transform(Xq, yq)

    def neg_margin(outputs, y):
        z_y = outputs.gather(1, y[:, None])[:, 0]
        others = outputs.scatter(1, y[:, None], float("-inf"))
        return -(z_y - torch.logsumexp(others, 1))

    S_c = TracIn(lr_model, target=neg_margin).fit(X, y).transform(Xq, yq)
    assert_scores_close(S_m, S_c)
    S_l = TracIn(lr_model).fit(X, y).transform(Xq, yq)
    # margin and loss agree in sign pattern for well-classified queries (loss = -log sigmoid(m)
    # is monotone in the margin for two classes; here: strong rank agreement)
    assert spearmanr(S_m.ravel(), S_l.ravel())[0] > 0.5


def test_pipeline_with_attributor_as_last_step(digits):
    X, y, Xq, yq = digits
    pipe = Pipeline([("scale", StandardScaler()),
                     ("attr", TracIn(LogisticRegression(max_iter=500)))])
    pipe.fit(X, y)
    S = pipe.transform(Xq)
    assert S.shape == (len(Xq), len(X))
    scaled = pipe["scale"].transform
    direct = TracIn(pipe["attr"].estimator_).fit(scaled(X), y).transform(scaled(Xq))
    assert_scores_close(S, direct)


def test_fitted_pipeline_as_estimator(digits):
    X, y, Xq, yq = digits
    pipe = Pipeline([("scale", StandardScaler()),
                     ("lr", LogisticRegression(max_iter=500))]).fit(X, y)
    S = TracIn(pipe).fit(X, y).transform(Xq, yq)
    scaled = pipe["scale"].transform
    direct = TracIn(pipe["lr"]).fit(scaled(X), y).transform(scaled(Xq), yq)
    assert_scores_close(S, direct)


def test_clone_keeps_fitted_model_and_refits_unfitted(digits, lr_model):
    X, y, Xq, yq = digits
    attr = TracIn(lr_model, batch_size=9)
    assert clone(attr).estimator is lr_model
    un = TracIn(LogisticRegression(max_iter=300))
    c = clone(un)
    assert c.estimator is not un.estimator
    c.fit(X, y)
    assert c.estimator_ is not c.estimator
    with pytest.raises(NotFittedError):
        un.transform(Xq)
    assert_scores_close(c.transform(Xq, yq), TracIn(c.estimator_).fit(X, y).transform(Xq, yq))


def test_unfitted_skorch_is_trained_deterministically(digits):
    from skorch import NeuralNetClassifier

    from tests.conftest import MLP

    X, y, Xq, yq = digits
    net = NeuralNetClassifier(MLP, criterion=torch.nn.CrossEntropyLoss, max_epochs=2,
                              train_split=None, verbose=0)
    a = TracIn(net, random_state=3).fit(X[:80], y[:80]).transform(Xq, yq)
    b = TracIn(net, random_state=3).fit(X[:80], y[:80]).transform(Xq, yq)
    np.testing.assert_array_equal(a, b)
    assert not getattr(net, "initialized_", False)  # the user's net is untouched


def test_dict_and_tensor_and_dataset_inputs(digits, make_mlp):
    X, y, Xq, yq = digits

    class DictMLP(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixels):
            return self.inner(pixels)

    inner = make_mlp()
    base = TracIn(inner, loss="cross_entropy").fit(X[:40], y[:40]).transform(Xq, yq)
    dict_attr = TracIn(DictMLP(inner), loss="cross_entropy").fit({"pixels": X[:40]}, y[:40])
    assert_scores_close(dict_attr.transform({"pixels": Xq}, yq), base)
    t_attr = TracIn(inner, loss="cross_entropy").fit(torch.tensor(X[:40]), torch.tensor(y[:40]))
    assert_scores_close(t_attr.transform(torch.tensor(Xq), torch.tensor(yq)), base)
    ds = torch.utils.data.TensorDataset(torch.tensor(X[:40]), torch.tensor(y[:40]))
    qs = torch.utils.data.TensorDataset(torch.tensor(Xq), torch.tensor(yq))
    d_attr = TracIn(inner, loss="cross_entropy", batch_size=7).fit(ds)
    assert_scores_close(d_attr.transform(qs), base)


def test_input_validation(digits, lr_model):
    X, y, Xq, yq = digits
    attr = TracIn(lr_model).fit(X, y)
    with pytest.raises(ValueError, match="features"):
        attr.transform(Xq[:, :10], yq)
    with pytest.raises(ValueError, match="NaN"):
        bad = Xq.copy()
        bad[0, 0] = np.nan
        attr.transform(bad, yq)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        attr.transform(Xq, yq[:3])
    with pytest.raises(ValueError, match="labels the model was not trained on"):
        attr.transform(Xq, yq + 100)
    with pytest.raises(ValueError, match="requires y"):
        TracIn(lr_model).fit(X)
    with pytest.raises(ValueError, match="batch_size"):
        TracIn(lr_model, batch_size=0).fit(X, y)


def test_verbose_progress_bars(digits, lr_model, capsys):
    X, y, Xq, yq = digits
    TracIn(lr_model, verbose=1, batch_size=50).fit(X, y).transform(Xq, yq)
    assert "gradients" in capsys.readouterr().err


def test_float_dtype_follows_model(digits, make_mlp):
    X, y, Xq, yq = digits
    S = TracIn(make_mlp(dtype=torch.float32), loss="cross_entropy").fit(X[:20], y[:20])
    assert S.transform(Xq, yq).dtype == np.float32
    assert S.ghost_layout_ is not None  # ghost products: the cache holds factor rows
    assert S.train_grads_[0].dtype == torch.float32
    assert S.train_grads_[0].shape == (20, S.ghost_layout_.width)


def test_loss_override_and_callable_loss(digits, make_mlp):
    X, y, Xq, yq = digits
    mod = make_mlp()

    def ce(outputs, y):
        return F.cross_entropy(outputs, y, reduction="none")

    a = TracIn(mod, loss=ce).fit(X[:30], y[:30]).transform(Xq, yq)
    b = TracIn(mod, loss=torch.nn.CrossEntropyLoss()).fit(X[:30], y[:30]).transform(Xq, yq)
    c = TracIn(mod, loss="cross_entropy").fit(X[:30], y[:30]).transform(Xq, yq)
    assert_scores_close(a, c)
    assert_scores_close(b, c)


def test_checkpoint_with_layers_uses_the_checkpoints_other_parameters(digits, make_mlp):
    """Gradients of the selected layers are taken at the checkpoint's full parameters."""
    X, y, Xq, yq = digits
    final, early = make_mlp(seed=0), make_mlp(seed=1)
    via_ckpt = TracIn(final, loss="cross_entropy", layers="out",
                      checkpoints=[early.state_dict()]).fit(X[:40], y[:40])
    direct = TracIn(early, loss="cross_entropy", layers="out").fit(X[:40], y[:40])
    assert_scores_close(via_ckpt.transform(Xq, yq), direct.transform(Xq, yq))


@pytest.mark.parametrize("proj_type", ["gaussian", "rademacher", "sjlt"])
def test_projected_gradients(digits, lr_model, proj_type):
    """proj_dim: scores are inner products of the projected gradients (same projector
    for train and query), and approach the unprojected scores as proj_dim grows."""
    X, y, Xq, yq = digits
    G = _manual_grads(lr_model.coef_, lr_model.intercept_, X, y)
    Q = _manual_grads(lr_model.coef_, lr_model.intercept_, Xq, yq)
    attr = TracIn(lr_model, proj_dim=256, proj_type=proj_type, random_state=0,
                  batch_size=23).fit(X, y)
    P = attr.projector_(torch.eye(G.shape[1], dtype=torch.float64)).numpy()  # (p, k)
    S = attr.transform(Xq, yq)
    assert_scores_close(S, (Q @ P) @ (G @ P).T)
    assert S.shape == (len(Xq), len(X))
    exact = Q @ G.T
    big = TracIn(lr_model, proj_dim=640, proj_type=proj_type, random_state=0).fit(X, y)
    rho_big = spearmanr(big.transform(Xq, yq).ravel(), exact.ravel())[0]
    assert rho_big > max(0.8, spearmanr(S.ravel(), exact.ravel())[0])
    # at or above the 650 gradient coordinates there is nothing to gain: exact, unprojected
    with pytest.warns(UserWarning, match="proj_dim=4096 is not below the 650 gradient"):
        full = TracIn(lr_model, proj_dim=4096, proj_type=proj_type, random_state=0).fit(X, y)
    assert full.projector_ is None
    np.testing.assert_allclose(full.transform(Xq, yq), exact, rtol=0,
                               atol=64 * np.finfo(float).eps * np.abs(exact).max())
    other = TracIn(lr_model, proj_dim=256, proj_type=proj_type, random_state=1).fit(X, y)
    assert not np.allclose(other.transform(Xq, yq), S)
