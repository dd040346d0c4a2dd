"""The benchmark's method registry: one :class:`Method` per attribution method.

A method is a name, a factory ``(setting, fitted_model, checkpoints) -> unfitted
attributor``, a test of whether it applies to a setting and, where self-influence is not
the right signal, how it ranks training samples as suspected mislabels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.base import clone
from skorch import NeuralNet

from ..dvemb import DVEmb
from ..influence import InfluenceFunction
from ..logra import LoGra
from ..representer import RepresenterPoints
from ..shapley import KNNShapley
from ..tracin import TracIn
from ..trak import TRAK

__all__ = ["METHODS", "Method", "get_method", "list_methods"]


def _always(setting):
    return True


@dataclass(frozen=True)
class Method:
    """One entry of the benchmark registry.

    Parameters
    ----------
    name : str
        Name used on the command line and in the results.
    factory : callable
        ``factory(setting, fitted_model, checkpoints)`` returns an unfitted attributor
        (``fit(X_train, y_train)``, ``transform(X_test, y_test)``).
    applicable : callable, default=always
        ``applicable(setting) -> bool``.
    description : str
        One line for ``--list``.
    records_steps : bool, default=False
        Whether the method replays the training run step by step (DVEmb): the runner
        then records every step's projected gradients while it trains the model.

    Notes
    -----
    Mislabel detection ranks training samples by ``self_influence()``: for every
    attributor high means atypical or mislabelled, so no method needs a special case.
    """

    name: str
    factory: object
    applicable: object = _always
    description: str = ""
    records_steps: bool = False


def _is_torch(setting):
    return isinstance(setting.estimator, NeuralNet)


def _is_classification(setting):
    return setting.task == "classification"


def _grad_dot(setting, model, checkpoints):
    return TracIn(model)


def _grad_cos(setting, model, checkpoints):
    return TracIn(model, normalize=True)


def _tracin(setting, model, checkpoints):
    return TracIn(model, checkpoints=list(checkpoints.states),
                  learning_rates=list(checkpoints.learning_rates))


# Damping of the influence solvers.  scikit-learn models bring their own L2 penalty into
# the Hessian; the tiny damping only removes the null direction of a multinomial model's
# intercepts (adding a constant to every class), which no gradient has a component along.
# Neural nets have indefinite Hessians: the damping (relative to a mean-loss Hessian)
# keeps the solvers well posed.
_SK_DAMPING = 1e-6
_NET_DAMPING = 1e-2


def _influence(solver):
    """Every solver on its defaults; only the damping is set (none for DataInf, K-FAC and
    EK-FAC, whose defaults are the papers' heuristics)."""

    def factory(setting, model, checkpoints):
        damping = _NET_DAMPING if _is_torch(setting) else _SK_DAMPING
        params = ({} if solver in ("datainf", "kfac", "ekfac")
                  else {"regularization": damping})
        return InfluenceFunction(model, solver=solver, **params)

    factory.__name__ = f"_influence_{solver}"
    return factory


def _trak(n_models):
    def factory(setting, model, checkpoints):
        if n_models == 1:
            return TRAK(model)
        # an unfitted estimator: TRAK trains its own ensemble in fit (timed with it)
        return TRAK(clone(setting.estimator), n_models=n_models)

    factory.__name__ = f"_trak_{n_models}"
    return factory


def _has_dropout(setting):
    """skorch settings whose module has dropout layers (``module__dropout > 0``)."""
    return _is_torch(setting) and float(
        setting.estimator.get_params().get("module__dropout", 0) or 0) > 0


def _trak_dropout(setting, model, checkpoints):
    # ten members: the fitted net under ten fixed dropout masks (dattri's MC-dropout TRAK)
    return TRAK(model, dropout=True, n_models=10)


def _logra(**params):
    def factory(setting, model, checkpoints):
        return LoGra(model, **params)

    factory.__name__ = "_logra_" + "_".join(f"{k}_{v}" for k, v in params.items())
    return factory


def _dvemb(setting, model, checkpoints):
    return DVEmb(model, recorder=checkpoints.recorder)


def _representer(setting, model, checkpoints):
    return RepresenterPoints(model)


def _flatten(X):
    """Rows of ``X`` as flat feature vectors (KNN-Shapley on images)."""
    X = np.asarray(X)
    return X.reshape(len(X), -1)


def _knn_shapley(setting, model, checkpoints):
    embedding = _flatten if np.asarray(setting.X_train).ndim > 2 else None
    return KNNShapley(n_neighbors=5, embedding=embedding)


METHODS = [
    Method("grad-dot", _grad_dot,
           description="TracIn on the final model only (gradient dot product)"),
    Method("grad-cos", _grad_cos, description="gradient cosine on the final model"),
    Method("tracin", _tracin,
           description="TracInCP over the training checkpoints, weighted by learning rate"),
    Method("if-explicit", _influence("explicit"),
           description="influence function, dense curvature factorised once"),
    Method("if-cg", _influence("cg"), description="influence function, conjugate gradient"),
    Method("if-lissa", _influence("lissa"), description="influence function, LiSSA recursion"),
    Method("if-arnoldi", _influence("arnoldi"),
           description="influence function, top Arnoldi eigenpairs"),
    Method("if-nystrom", _influence("nystrom"),
           description="influence function, rank-50 Nystrom sketch (pyDVL's Nystroem)"),
    Method("if-datainf", _influence("datainf"), description="DataInf layer-wise closed form"),
    Method("if-diagonal", _influence("diagonal"),
           description="influence function, diagonal Fisher (kronfluence's diagonal)"),
    Method("if-kfac", _influence("kfac"), description="influence function, K-FAC curvature"),
    Method("if-ekfac", _influence("ekfac"), description="influence function, EK-FAC curvature"),
    Method("trak", _trak(1), description="TRAK on the final model (its defaults)"),
    Method("trak-5", _trak(5), applicable=_is_torch,
           description="TRAK over 5 independently trained models (trained inside fit)"),
    Method("trak-10", _trak(10), applicable=_is_torch,
           description="TRAK over 10 independently trained models (trained inside fit)"),
    Method("trak-dropout", _trak_dropout, applicable=_has_dropout,
           description="TRAK over 10 dropout masks of the final model (dropout settings)"),
    Method("logra", _logra(), description="LoGra: Kronecker-projected layer gradients, "
           "per-layer projected Fisher (proj_dim 4096)"),
    Method("factgrass", _logra(proj_type="grass"),
           description="FactGraSS: masked factors, outer product, sparse JL, per-layer Fisher"),
    Method("grass", _logra(proj_type="grass", factorized=False),
           description="GraSS: random mask + sparse JL of each layer gradient, per-layer Fisher"),
    Method("dvemb", _dvemb, applicable=_is_torch, records_steps=True,
           description="data value embeddings of the recorded SGD steps (DVEmb)"),
    Method("rps", _representer, description="representer points (L2-refit last layer)"),
    Method("knn-shapley", _knn_shapley, applicable=_is_classification,
           description="exact KNN-Shapley on the input features (k=5)"),
]


def get_method(name):
    """The registry entry called ``name``.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the known ones).
    """
    for method in METHODS:
        if method.name == name:
            return method
    raise ValueError(
        f"Unknown method {name!r}; available: {', '.join(m.name for m in METHODS)}."
    )


def list_methods():
    """Names and descriptions of the registered methods.

    Returns
    -------
    methods : list of (str, str)
        ``(name, description)``, in the order the runner runs them.

    Examples
    --------
    >>> from skdattri.benchmark import list_methods
    >>> list_methods()[0]
    ('grad-dot', 'TracIn on the final model only (gradient dot product)')
    """
    return [(m.name, m.description) for m in METHODS]


def _select_methods(methods, setting):
    """The registry entries called ``methods`` (``None``: all that apply to ``setting``).

    Raises
    ------
    ValueError
        For an unknown name, or a named method that does not apply to the setting.
    """
    if methods is None:
        return [m for m in METHODS if m.applicable(setting)]
    chosen = [get_method(name) for name in methods]
    for m in chosen:
        if not m.applicable(setting):
            raise ValueError(f"Method {m.name!r} does not apply to setting "
                             f"{setting.name!r}: {m.description}.")
    return chosen

