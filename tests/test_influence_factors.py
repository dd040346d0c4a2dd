"""EK-FAC / K-FAC / diagonal influence with the training side as layer factors (float64).

The factor rows (``factor_layout_``) must give the scores, the self-influence, the
normalised scores and the gradient rows of the plain gradient cache
(``config_context(ghost=False)``), for single-position layers (an MLP), convolutions
with many positions (forced ``ghost=True``) and layers kept explicit (``"auto"`` on a
CNN), over several batches, in memory and on disk.
"""

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from skdattri import InfluenceFunction, config_context
from skdattri._factor_grads import _FactorGradients
from skdattri.estimator_checks import assert_scores_close


@pytest.fixture(autouse=True)
def _factors_for_small_caches(monkeypatch):
    """The caches here are small: factors for any size (the size rule is tested below)."""
    from skdattri import influence

    monkeypatch.setattr(influence, "_FACTOR_MIN_BYTES", 0)


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3, dtype=torch.float64)
        self.out = nn.Linear(3 * 6 * 6, 10, dtype=torch.float64)

    def forward(self, X):
        h = torch.tanh(self.conv(X.reshape(-1, 1, 8, 8)))
        return self.out(h.flatten(1))


def _pair(make, X, y, ghost="auto", **kw):
    with config_context(ghost=ghost):
        factors = make(**kw).fit(X, y)
    with config_context(ghost=False):
        dense = make(**kw).fit(X, y)
    return factors, dense


@pytest.mark.parametrize("solver", ["ekfac", "kfac", "diagonal"])
@pytest.mark.parametrize("normalize", [False, True, "theta"])
def test_mlp_factors_equal_the_gradient_cache(digits, make_mlp, solver, normalize):
    X, y, Xq, yq = digits

    def make(**kw):
        return InfluenceFunction(make_mlp(seed=0), loss="cross_entropy", solver=solver,
                                 regularization=1e-2, normalize=normalize, batch_size=37,
                                 random_state=0)

    factors, dense = _pair(make, X, y)
    layout = factors.factor_layout_
    assert layout is not None and dense.factor_layout_ is None
    G = factors.train_grads_[0]
    assert isinstance(G, _FactorGradients)
    assert G.factors.shape == (200, layout.width) and layout.width < G.shape[1] == 1210
    np.testing.assert_allclose(G[5:80].numpy(), dense.train_grads_[0][5:80].numpy(),
                               rtol=0, atol=1e-14 * float(dense.train_grads_[0][:].abs().max()))
    assert_scores_close(factors.transform(Xq, yq), dense.transform(Xq, yq))
    assert_scores_close(factors.self_influence(), dense.self_influence())


@pytest.mark.parametrize("ghost", ["auto", True])
def test_convolution_factors_equal_the_gradient_cache(digits, ghost):
    """``"auto"`` keeps the convolution's gradient (36 positions) and the linear layer's
    factors; ``True`` keeps factors for both (sums over positions)."""
    X, y, Xq, yq = digits

    def make(**kw):
        return InfluenceFunction(_CNN(), loss="cross_entropy", solver="ekfac",
                                 regularization=1e-2, batch_size=64, random_state=0)

    factors, dense = _pair(make, X, y, ghost=ghost)
    layout = factors.factor_layout_
    ghosts = [entry[0] for entry in layout.ghost]
    assert ghosts == (["out"] if ghost == "auto" else ["conv", "out"])
    assert [entry[0] for entry in layout.dense] == (["conv"] if ghost == "auto" else [])
    ref = dense.train_grads_[0][:]
    np.testing.assert_allclose(factors.train_grads_[0][:].numpy(), ref.numpy(), rtol=0,
                               atol=1e-13 * float(ref.abs().max()))
    assert_scores_close(factors.transform(Xq, yq), dense.transform(Xq, yq))
    assert_scores_close(factors.self_influence(), dense.self_influence())


def test_factors_on_disk_pickle_and_reload(digits, make_mlp, tmp_path):
    X, y, Xq, yq = digits
    memory = InfluenceFunction(make_mlp(seed=1), loss="cross_entropy", solver="ekfac",
                               regularization=1e-2, random_state=0).fit(X, y)
    disk = InfluenceFunction(make_mlp(seed=1), loss="cross_entropy", solver="ekfac",
                             regularization=1e-2, random_state=0, store=tmp_path).fit(X, y)
    assert type(disk.train_grads_[0].factors).__name__ == "DiskStore"
    S = memory.transform(Xq, yq)
    np.testing.assert_array_equal(disk.transform(Xq, yq), S)
    again = pickle.loads(pickle.dumps(disk))
    np.testing.assert_array_equal(again.transform(Xq, yq), S)


def test_solvers_that_read_the_gradients_keep_them(digits, make_mlp):
    """DataInf and the empirical Fisher use the gradient rows in every product: they
    keep them; the curvature solvers keep factors, with the scores of the gradients."""
    X, y, Xq, yq = digits
    for kw in ({"solver": "datainf"},
               {"solver": "cg", "hessian": "fisher", "regularization": 1e-1, "max_iter": 5}):
        attr = InfluenceFunction(make_mlp(seed=0), loss="cross_entropy", **kw).fit(X, y)
        assert attr.factor_layout_ is None
        assert not isinstance(attr.train_grads_[0], _FactorGradients)

    def make(**kw):
        return InfluenceFunction(make_mlp(seed=0), loss="cross_entropy", solver="cg",
                                 hessian="ggn", regularization=1e-1, max_iter=5,
                                 normalize=True, batch_size=64)

    factors, dense = _pair(make, X, y)
    assert isinstance(factors.train_grads_[0], _FactorGradients)
    assert_scores_close(factors.transform(Xq, yq), dense.transform(Xq, yq))


def test_factor_products_in_small_parts_give_the_same_scores(digits, make_mlp, monkeypatch):
    """Query rows and train rows cut into parts of a few rows (a tiny temporary budget):
    the same scores as whole blocks."""
    from skdattri import _factor_grads

    X, y, Xq, yq = digits
    attr = InfluenceFunction(make_mlp(seed=2), loss="cross_entropy", solver="ekfac",
                             regularization=1e-2, random_state=0).fit(X, y)
    whole = attr.transform(Xq, yq)
    monkeypatch.setattr(_factor_grads, "_INNER_ELEMENTS", 2500)  # 2 query rows, 9 train rows
    assert_scores_close(attr.transform(Xq, yq), whole)


@pytest.mark.parametrize("ghost", ["auto", True])
def test_top_k_from_factors_equals_transform(digits, ghost):
    """Scores from factors do not depend on how the training rows are blocked: top_k
    (blocks of 7) returns exactly the scores of transform."""
    X, y, Xq, yq = digits
    with config_context(ghost=ghost):
        attr = InfluenceFunction(_CNN(), loss="cross_entropy", solver="ekfac",
                                 regularization=1e-2, random_state=0).fit(X, y)
    assert attr.factor_layout_ is not None
    S = attr.transform(Xq, yq)
    top = attr.top_k(Xq, yq, k=9, train_block_size=7)
    order = np.argsort(-S, axis=1, kind="stable")[:, :9]
    np.testing.assert_array_equal(top.indices, order)
    np.testing.assert_array_equal(top.scores, np.take_along_axis(S, order, 1))


def test_small_caches_keep_the_gradients_unless_asked(digits, make_mlp, monkeypatch):
    """With ghost="auto" a cache of at most _FACTOR_MIN_BYTES stays a plain gradient
    cache (faster to score); ghost=True keeps factors whatever the size."""
    from skdattri import influence

    X, y, _, _ = digits
    monkeypatch.setattr(influence, "_FACTOR_MIN_BYTES", 200 * 1210 * 8)  # this cache
    make = lambda: InfluenceFunction(make_mlp(seed=0), loss="cross_entropy",  # noqa: E731
                                     solver="ekfac", regularization=1e-2)
    assert make().fit(X, y).factor_layout_ is None
    with config_context(ghost=True):
        assert make().fit(X, y).factor_layout_ is not None
    monkeypatch.setattr(influence, "_FACTOR_MIN_BYTES", 200 * 1210 * 8 - 1)
    assert make().fit(X, y).factor_layout_ is not None


@pytest.mark.parametrize("solver", ["ekfac", "kfac", "diagonal"])
@pytest.mark.parametrize("ghost", [True, False])
def test_solves_written_into_the_query_gradients_change_nothing(solver, ghost, digits,
                                                                make_mlp, monkeypatch):
    """transform solves into its own query-gradient block (several parts of rows): the
    scores equal a solve into fresh memory, and the training cache is left as it was."""
    import skdattri.func.kfac as kfac
    from skdattri import influence

    X, y, Xq, yq = digits
    with config_context(ghost=ghost):
        attr = InfluenceFunction(make_mlp(), loss="cross_entropy", solver=solver,
                                 regularization=0.1, batch_size=32).fit(X[:120], y[:120])
        before = attr.self_influence()
        rows = attr.train_grads_[0][0:120].clone()
        monkeypatch.setattr(kfac, "_SOLVE_ELEMENTS", 3 * rows.shape[1])  # 3 rows a part
        S = attr.transform(Xq, yq)
        monkeypatch.setattr(influence.InfluenceFunction, "_solve",
                            lambda self, c, Q, overwrite=False: self.solvers_[c].solve(Q))
        assert_scores_close(S, attr.transform(Xq, yq))
        torch.testing.assert_close(attr.train_grads_[0][0:120], rows, rtol=0, atol=0)
        assert_scores_close(attr.self_influence(), before)


@pytest.mark.parametrize("case", ["mlp", "cnn-auto", "cnn-forced", "disk"])
def test_square_mean_from_factors_equals_the_rows(case, digits, make_mlp, tmp_path):
    """The empirical Fisher diagonal from squared factors (one position) or rows formed a
    block at a time (several positions, explicit columns) equals the rows' square mean."""
    X, y, _, _ = digits
    net = _CNN() if case.startswith("cnn") else make_mlp()
    kw = {"store": tmp_path} if case == "disk" else {}
    with config_context(ghost=True if case == "cnn-forced" else "auto"):
        attr = InfluenceFunction(net, loss="cross_entropy", solver="diagonal",
                                 regularization=1e-2, **kw).fit(X[:90], y[:90])
    G = attr.train_grads_[0]
    assert isinstance(G, _FactorGradients)
    rows = G[0:90]
    expected = (rows * rows).mean(0)
    atol = 64 * torch.finfo(rows.dtype).eps * float(expected.abs().max())
    torch.testing.assert_close(G.square_mean(), expected, rtol=0, atol=atol)
