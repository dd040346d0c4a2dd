"""Fitted state: every tensor is reached by the device mover, transform does no train-side
work and changes nothing."""

import copy
import io
import pickle
import types

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from skdattri import TRAK, InfluenceFunction, RepresenterPoints, TracIn
from skdattri._solvers import SOLVERS
from skdattri._state import _map_state
from skdattri.base import BaseAttributor
from skdattri.func.hessian import DenseOperator, LinearOperator
from skdattri.func.sketch import _DataTerm

SOLVER_KWARGS = {
    "explicit": {},
    "cg": {"tol": 1e-10, "max_iter": 200},
    "lissa": {"depth": 50, "scale": 50.0},
    "arnoldi": {"n_components": 10, "max_iter": 30},
    "nystrom": {"n_components": 10},
    "datainf": {},
    "diagonal": {},
    "kfac": {},
    "ekfac": {},
}


def _attributors(model, loss=None):
    kw = {"loss": loss} if loss is not None else {}
    # a network's exact Hessian is indefinite: its influence uses the Gauss-Newton matrix
    curvature = {"hessian": "ggn"} if loss is not None else {}
    out = [
        TracIn(model, **kw),
        TracIn(model, proj_dim=8, proj_type="gaussian", random_state=0, **kw),
        TracIn(model, target="margin", normalize=True, **kw),
        TRAK(model, proj_dim=8, regularization=1e-2, random_state=0, **kw),
        TRAK(model, proj_dim=8, regularization=1e-2, target="loss", random_state=0, **kw),
        RepresenterPoints(model, **kw),
    ]
    for solver, extra in SOLVER_KWARGS.items():
        out.append(InfluenceFunction(model, solver=solver, regularization=1e-2,
                                     random_state=0, **extra, **kw, **curvature))
    out.append(InfluenceFunction(model, solver="cg", regularization=1e-2, normalize=True,
                                 target="margin", **kw, **curvature))
    return out


@pytest.fixture(scope="module")
def data(digits):
    X, y, Xq, yq = digits
    return X[:60], y[:60], Xq[:5], yq[:5]


@pytest.fixture(scope="module")
def models(data):
    X, y, _, _ = data
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 10)).double()
    return [(LogisticRegression(max_iter=300).fit(X, y), None), (net, "cross_entropy")]


def _cases(models):
    return [a for model, loss in models for a in _attributors(model, loss)]


class _TensorFinder(pickle.Pickler):
    """Pickles ``obj`` and lists every tensor met on the way (without serialising it)."""

    def __init__(self):
        super().__init__(io.BytesIO())
        self.found = []

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor):
            self.found.append(obj)
            return ("tensor", len(self.found))
        return None


def test_every_solver_is_in_the_table():
    assert set(SOLVER_KWARGS) == set(SOLVERS)


def test_every_tensor_of_the_fitted_state_is_reached_by_the_device_mover(models, data):
    X, y, Xq, yq = data
    for attr in _cases(models):
        attr.fit(X, y)
        before = attr.transform(Xq, yq)
        state = attr.__getstate__()
        moved = attr._moved_state(state, lambda t: t.to("meta"), "meta")
        finder = _TensorFinder()
        # fitted attributes, less the models being explained (estimators keep their own
        # device handling: skorch moves its module, a user's nn.Module is the user's)
        finder.dump({k: v for k, v in moved.items()
                     if k.endswith("_") and k not in ("estimator_", "estimators_")})
        left = [tuple(t.shape) for t in finder.found if t.device.type != "meta"]
        assert not left, f"{attr!r}: tensors outside _device_attributes: {left[:5]}"
        assert any(t.device.type == "meta" for t in finder.found)
        # the mover never modifies what it moves
        np.testing.assert_array_equal(attr.transform(Xq, yq), before)


def test_mover_keeps_shared_tensors_shared_and_moves_devices():
    t = torch.ones(3)

    class Holder:  # a foreign object is passed through as it is
        pass

    foreign = Holder()
    state = {"a": t, "b": [t, {"c": t}], "d": torch.device("cpu"), "e": foreign}
    moved = _map_state(state, lambda x: x * 2, "meta")
    assert moved["a"] is moved["b"][0] is moved["b"][1]["c"]
    assert torch.equal(moved["a"], torch.full((3,), 2.0)) and torch.equal(t, torch.ones(3))
    assert moved["d"] == torch.device("meta") and moved["e"] is foreign


def _snapshot(attr):
    state = {k: v for k, v in vars(attr).items() if k.endswith("_") and k != "estimator_"}
    return copy.deepcopy(state)


def _same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _same(u, v, f"{path}[{i}]")
    elif isinstance(a, torch.nn.Module):
        _same(a.state_dict(), b.state_dict(), path)
    elif hasattr(a, "__dict__") and not isinstance(a, (type, types.FunctionType,
                                                       types.MethodType)):
        assert type(a) is type(b), path
        _same(vars(a), vars(b), path)
    elif not callable(a):
        assert a == b, path


def test_transform_does_no_train_side_work_and_changes_no_fitted_attribute(
        models, data, monkeypatch):
    X, y, Xq, yq = data
    counts = {"operators": 0, "device copies": 0, "dense": 0}
    init, copies = LinearOperator.__init__, BaseAttributor._device_batches

    def counting_init(self, *args, **kwargs):
        # a small closed-form curvature is then formed once as a DenseOperator, and the
        # Nystrom sketch takes the data term of the operator (_DataTerm): the same
        # curvature, not a second one
        counts["operators"] += not isinstance(self, (DenseOperator, _DataTerm))
        counts["dense"] += isinstance(self, DenseOperator)
        init(self, *args, **kwargs)

    def counting_copies(self, *args, **kwargs):
        counts["device copies"] += 1
        return copies(self, *args, **kwargs)

    monkeypatch.setattr(LinearOperator, "__init__", counting_init)
    monkeypatch.setattr(BaseAttributor, "_device_batches", counting_copies)
    for attr in _cases(models):
        attr.fit(X, y)
        if isinstance(attr, InfluenceFunction) and attr.solver in ("explicit", "cg", "lissa",
                                                                   "arnoldi", "nystrom"):
            assert counts["operators"] == len(attr.solvers_) and counts["device copies"] == 1
        if isinstance(attr, InfluenceFunction) and attr.solver in ("diagonal", "kfac", "ekfac"):
            # no curvature operator; one device copy of the training set (sampled targets)
            assert counts["operators"] == 0 and counts["device copies"] == 1
        before = _snapshot(attr)
        for key in counts:
            counts[key] = 0
        attr.transform(Xq, yq)
        attr.transform(Xq)
        attr.self_influence()
        assert counts == {"operators": 0, "device copies": 0, "dense": 0}, repr(attr)
        _same(before, _snapshot(attr), repr(attr))
