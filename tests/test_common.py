"""The contract of every attributor, in one place.

- skdattri's named attributor checks (:mod:`skdattri.estimator_checks`) over every
  attributor and every ``InfluenceFunction`` solver, on fitted and unfitted models;
- scikit-learn's ``parametrize_with_checks`` over the five attributor classes, built on
  unfitted models (sklearn's checks train them on their own data).

Data are small (40 digits of five classes to train on, 8 queries) so the file runs in
seconds.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

from skdattri import (
    TRAK,
    DVEmb,
    InfluenceFunction,
    KNNShapley,
    LoGra,
    RepresenterPoints,
    TracIn,
)
from skdattri.estimator_checks import (
    assert_scores_close,
    check_attributor,
    check_batch_size_invariance,
    check_clone_keeps_fitted_model,
    check_orientation,
    check_self_influence_is_diagonal,
    check_sign,
    check_transform_keeps_fitted_state,
    parametrize_with_attributor_checks,
)


class _LazyMLP(nn.Module):
    """Infers its input width, so sklearn's checks can vary n_features.

    float64, so that sklearn's checks (which compare at rtol 1e-7) see float64
    round-off. skdattri hands a skorch net float32 X when it trains it
    (``model/_dispatch.py::_skorch_inputs``), so float inputs are cast back here;
    integer X is left alone (token ids, see SKORCH_XFAIL).
    """

    def __init__(self, n_classes=10):
        super().__init__()
        self.hidden = nn.LazyLinear(8, dtype=torch.float64)
        self.out = nn.Linear(8, n_classes, dtype=torch.float64)

    def forward(self, X):
        if X.is_floating_point():
            X = X.to(torch.float64)
        return self.out(torch.relu(self.hidden(X)))


def _skorch_net(**kwargs):
    from skorch import NeuralNetClassifier

    return NeuralNetClassifier(_LazyMLP, criterion=nn.CrossEntropyLoss, max_epochs=5, lr=0.2,
                               optimizer=torch.optim.Adam, batch_size=32, train_split=None,
                               verbose=0, **kwargs)


def _sgd_net():
    """An unfitted skorch net trained by plain SGD: DVEmb trains it in fit with a
    recorder attached (its only way to see a training set that the checks change)."""
    from skorch import NeuralNetClassifier

    return NeuralNetClassifier(_LazyMLP, criterion=nn.CrossEntropyLoss, max_epochs=5, lr=0.2,
                               optimizer=torch.optim.SGD, batch_size=16, train_split=None,
                               iterator_train__shuffle=True, verbose=0)


# ----------------------------------------------------------------------------- data, models
def _digits():
    """Digits 0-4 (325 parameters in a linear model): 40 to train on, 8 queries."""
    X, y = load_digits(return_X_y=True)
    X, keep = X / 16.0, y < 5
    train, query = keep & (np.arange(len(y)) < 1000), keep & (np.arange(len(y)) >= 1000)
    return X[train][:40], y[train][:40], X[query][:8], y[query][:8]


DATA = _digits()
X_TRAIN, Y_TRAIN = DATA[0], DATA[1]

LR = LogisticRegression(max_iter=1000).fit(X_TRAIN, Y_TRAIN)
CHECKPOINTS = [LogisticRegression(C=C, max_iter=1000).fit(X_TRAIN, Y_TRAIN) for C in (0.1, 0.3)]
CHECKPOINTS.append(LR)


def _fitted_net():
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LazyLinear is experimental
        torch.manual_seed(0)
        return _skorch_net(module__n_classes=5).fit(X_TRAIN, Y_TRAIN)


NET = _fitted_net()
MODULE = copy.deepcopy(NET.module_)  # a plain torch module (with loss=)

# LiSSA converges like (1 - lambda_min / scale) ** depth: the curvature of LR has
# eigenvalues in [0, 0.91] (0: the intercepts' null direction); with regularization 0.1
# and scale 1.2 (> 0.91 + 0.1) depth 100 reaches (1 - 0.1 / 1.2) ** 100 ~ 2e-4
_LISSA = dict(regularization=0.1, scale=1.2, depth=100)

ATTRIBUTORS = [
    TracIn(LR),                                                   # Grad-Dot
    TracIn(LR, normalize=True),                                   # Grad-Cos
    TracIn(LogisticRegression(max_iter=1000), target="margin"),   # unfitted model
    TracIn(LR, checkpoints=CHECKPOINTS, learning_rates=[0.5, 1.0, 1.0]),
    TracIn(LR, proj_dim=32, random_state=0),
    TracIn(NET, normalize=True),
    InfluenceFunction(LR, solver="explicit", regularization=1e-3),
    InfluenceFunction(LR, solver="explicit", regularization=1e-3, normalize=True),  # RelatIF
    InfluenceFunction(LR, solver="cg", regularization=1e-3, tol=1e-12, max_iter=500),
    InfluenceFunction(LR, solver="lissa", random_state=0, **_LISSA),
    InfluenceFunction(LR, solver="arnoldi", regularization=1e-3, n_components=50,
                      max_iter=60, random_state=0),
    InfluenceFunction(LR, solver="nystrom", regularization=1e-3, n_components=50,
                      random_state=0),
    InfluenceFunction(LR, solver="datainf", regularization=1e-3),
    InfluenceFunction(LR, solver="diagonal", regularization=1e-3, random_state=0),
    InfluenceFunction(NET, solver="kfac", regularization=1e-3, random_state=0),
    InfluenceFunction(LR, solver="ekfac", regularization=1e-3, random_state=0),
    InfluenceFunction(NET, solver="ekfac", regularization=1e-3, random_state=0),
    InfluenceFunction(MODULE, loss="cross_entropy", solver="explicit", hessian="ggn",
                      layers=["out"], regularization=1e-3),
    TRAK(LR, proj_dim=32, regularization=1e-3, random_state=0),
    RepresenterPoints(LR, regularization=1e-2),
    RepresenterPoints(LR),  # its defaults: label targets, automatic regularization
    TRAK(LR),  # its defaults
    LoGra(LR, proj_dim=64, random_state=0),
    LoGra(NET, proj_dim=32, proj_type="grass", random_state=0),          # FactGraSS
    LoGra(LR, proj_dim=64, proj_type="grass", factorized=False, random_state=0),  # GraSS
    DVEmb(_sgd_net(), random_state=0),
    DVEmb(_sgd_net(), proj_dim=16, random_state=0),
    KNNShapley(n_neighbors=5),
]


def _check_options(attributor):
    if isinstance(attributor, InfluenceFunction) and attributor.solver == "cg":
        # cond(H + 1e-3 I) ~ 900 (the intercepts' null direction is damped by 1e-3 only):
        # CG stopped at a relative residual tol=1e-12 is accurate to cond x tol ~ 1e-9,
        # not to round-off (measured: 5e-13 relative to the largest score)
        return {"rtol": 1e-8}
    if isinstance(attributor, TRAK):
        # scores apply the inverse of a 32 x 32 kernel of condition number ~1e4, which
        # amplifies round-off as much: ~1e4 x eps = 2e-12 (measured: 4e-13)
        return {"rtol": 1e-10}
    if isinstance(attributor, RepresenterPoints):
        # the L-BFGS refit stops at max |gradient| < tol = 1e-10, which fixes W* (and the
        # scores) only to ~tol / (2 regularization) = 5e-9
        return {"rtol": 1e-7}
    return {}




def _expected_failed_attributor_checks(attributor):
    failed = {}
    if isinstance(attributor, InfluenceFunction) and attributor.solver == "lissa":
        failed["check_batch_size_invariance"] = (
            "LiSSA's recursion draws one mini-batch of batch_size training rows per step "
            "(batch_size is its sample size by design), so its estimate depends on it")
    return failed


@parametrize_with_attributor_checks(ATTRIBUTORS, data=DATA,
                                    expected_failed_checks=_expected_failed_attributor_checks,
                                    check_options=_check_options)
def test_attributor_checks(attributor, check):
    check(attributor)


# ----------------------------------------------------------------------------- the checks fail
class _Zeros(TracIn):
    def transform(self, X, y=None):
        return np.zeros_like(super().transform(X, y))


class _SameRowForAll(TracIn):
    def transform(self, X, y=None):
        S = super().transform(X, y)
        return np.broadcast_to(S[:1], S.shape).copy()


class _Counts(TracIn):
    def transform(self, X, y=None):
        self.n_transforms_ = getattr(self, "n_transforms_", 0) + 1
        return super().transform(X, y)


class _ScalesCache(TracIn):
    def transform(self, X, y=None):
        self.train_grads_[0][:].mul_(1.0 + 1e-12)  # in place, on the fitted rows
        return super().transform(X, y)


class _OffDiagonal(TracIn):
    def self_influence(self):
        return 2 * super().self_influence()


class _BatchDependent(TracIn):
    def transform(self, X, y=None):
        return super().transform(X, y) * (1 + 1e-9 * self.batch_size)


class _ClonesTheModel(TracIn):
    __sklearn_clone__ = BaseEstimator.__sklearn_clone__  # fitted model -> unfitted copy


@pytest.mark.parametrize("broken, check, message", [
    (_Zeros(LR), check_sign, "positive score"),
    (_SameRowForAll(LR), check_orientation, "same scores"),
    (_Counts(LR), check_transform_keeps_fitted_state, r"added \['n_transforms_'\]"),
    (_ScalesCache(LR), check_transform_keeps_fitted_state,
     r"train_grads_\[0\]._data: tensor values"),
    (_OffDiagonal(LR), check_self_influence_is_diagonal, "not the diagonal"),
    (_BatchDependent(LR), check_batch_size_invariance, "depend on batch_size"),
    (_ClonesTheModel(LR), check_clone_keeps_fitted_model, "keep the fitted estimator"),
])
def test_checks_catch_broken_attributors(broken, check, message):
    with pytest.raises(AssertionError, match=message):
        check(type(broken).__name__, broken, DATA)


def test_sign_check_needs_the_copy_on_top():
    """Strict rank: Grad-Dot's copy happens to be first here; a row whose copy ties with
    another score is not "first"; a constant positive row is never "top 10%"."""
    ones = type("_Ones", (TracIn,), {"transform": lambda self, X, y=None: np.ones(
        (len(X), self.n_train_))})
    with pytest.raises(AssertionError, match="top 4 of 41"):
        check_sign("Ones", ones(LR), DATA)
    with pytest.raises(AssertionError, match="largest score"):
        check_sign("Ones", ones(LR), DATA, strict_rank=True)
    check_sign("TracIn", TracIn(LR, normalize=True), DATA, strict_rank=True)


def test_assert_scores_close_scales_with_dtype_and_magnitude():
    S = np.array([[1e3, 1e-9, -5.0]])
    assert_scores_close(S + 1e-11, S)  # 1e-11 near zero: round-off of the largest score
    with pytest.raises(AssertionError, match="float64"):
        assert_scores_close(S + 1e-8, S)
    assert_scores_close((S + 1e-3).astype(np.float32), S)  # float32 round-off of 1e3
    with pytest.raises(AssertionError, match="float32"):
        assert_scores_close((S + 1e-1).astype(np.float32), S)
    assert_scores_close(torch.tensor(S) * (1 + 1e-7), S, rtol=1e-6)  # an explicit rtol
    with pytest.raises(AssertionError):
        assert_scores_close(S[:, :2], S)


def test_parametrize_ids_and_strict_expected_failures():
    mark = parametrize_with_attributor_checks(
        [TracIn(LR), KNNShapley()], data=DATA,
        expected_failed_checks=lambda a: {"check_sign": "why"} if isinstance(a, TracIn) else {},
    ).mark
    params = mark.args[1]
    ids = [p.id for p in params]
    assert "TracIn(estimator=LogisticRegression(max_iter=1000))-check_sign" in ids
    assert "KNNShapley()-check_transform_keeps_fitted_state" in ids
    marks = {p.id: p.marks for p in params if p.marks}
    assert list(marks) == ["TracIn(estimator=LogisticRegression(max_iter=1000))-check_sign"]
    (xfail,) = next(iter(marks.values()))
    assert xfail.name == "xfail" and xfail.kwargs == {"strict": True, "reason": "why"}
    with pytest.raises(ValueError, match="unknown checks"):
        parametrize_with_attributor_checks([KNNShapley()], data=DATA,
                                           expected_failed_checks=lambda a: {"check_x": "?"})


def test_check_attributor_runs_every_check_and_expected_failures_must_fail():
    S = check_attributor(TracIn(LR), *DATA)
    assert S.shape == (8, 40)
    with pytest.raises(AssertionError, match="passes but is listed"):
        check_attributor(TracIn(LR), *DATA, expected_failed_checks={"check_sign": "no"})
    check_attributor(_OffDiagonal(LR), *DATA,
                     expected_failed_checks={"check_self_influence_is_diagonal": "twice"})
    with pytest.raises(ValueError, match="unknown checks"):
        check_attributor(TracIn(LR), *DATA, expected_failed_checks={"check_typo": "?"})


# ----------------------------------------------------------------------------- sklearn checks
SKORCH_XFAIL = {
    "check_estimators_dtypes": (
        "skorch nets consume inputs as given: integer X is kept as token ids for embedding "
        "models, so a float network fed int64 X fails inside torch"
    ),
}


N_ITER_XFAIL = {
    "check_transformer_n_iter": (
        "InfluenceFunction's max_iter bounds the conjugate-gradient / Arnoldi iterations "
        "of its solver, which for 'cg' and 'lissa' run in transform, not in fit; no "
        "n_iter_ is set by fit"
    ),
}


def _expected_failed_checks(estimator):
    from skorch import NeuralNet

    failed = {}
    if isinstance(getattr(estimator, "estimator", None), NeuralNet):
        failed.update(SKORCH_XFAIL)
    if isinstance(estimator, InfluenceFunction):
        failed.update(N_ITER_XFAIL)
    return failed


ESTIMATORS = [
    TracIn(LogisticRegression()),
    TracIn(LogisticRegression(), normalize=True, target="margin"),
    TracIn(_skorch_net()),
    InfluenceFunction(LogisticRegression(), solver="explicit"),
    # tight tol: the checks compare permuted queries at rtol 1e-7, CG stops at tol
    InfluenceFunction(LogisticRegression(), solver="cg", normalize=True, tol=1e-12,
                      max_iter=500),
    InfluenceFunction(_skorch_net(), solver="ekfac"),
    TRAK(LogisticRegression()),  # its defaults (issue 10: 25 of 47 checks failed)
    TRAK(LogisticRegression(), proj_dim=8, regularization=1e-3),
    TRAK(_skorch_net(), proj_dim=8, regularization=1e-3),
    # a looser refit (tol) keeps sklearn's many fits fast; it changes no API behaviour
    RepresenterPoints(LogisticRegression(), regularization=1e-2, tol=1e-6),
    RepresenterPoints(_skorch_net(), regularization=1e-2, tol=1e-6),
    LoGra(LogisticRegression(), proj_dim=16, random_state=0),
    LoGra(_skorch_net(), proj_dim=16, random_state=0),
    DVEmb(_sgd_net(), proj_dim=8, random_state=0),
    KNNShapley(),
    KNNShapley(n_neighbors=1, metric="manhattan"),
]


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=_expected_failed_checks,
                         xfail_strict=True)
def test_sklearn_compatible(estimator, check):
    check(estimator)
