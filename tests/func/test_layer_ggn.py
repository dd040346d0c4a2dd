"""Gauss-Newton products from layer factors equal GGNOperator's (float64)."""

import numpy as np
import pytest
import torch
from torch import nn

import skdattri.func._layer_ggn as layer_ggn
from skdattri import InfluenceFunction, set_config
from skdattri.func._layer_ggn import LayerGGNOperator, layer_ggn_plan
from skdattri.func.hessian import GGNOperator
from skdattri.model import make_model

DT = torch.float64


def _assert_same(a, b):
    atol = 256 * torch.finfo(DT).eps * float(b.abs().max())
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


class Conv1D(nn.Module):
    """Hugging Face's transposed linear layer, recognised by its name and ``nf``."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=DT) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf, dtype=DT) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class _Sequence(nn.Module):
    """A linear layer at every position (T > 1: per-output Jacobians), then pooled."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 6)
        self.head = Conv1D(3, 6)

    def forward(self, x):                      # (n, 4, 5)
        return self.head(torch.tanh(self.proj(x)).mean(1))


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):                      # (n, 2, 5, 5)
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _mlp(k):
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, k))


def _cases():
    return {
        "mlp": (lambda: _mlp(4), "cross_entropy", (7,), 4, None),
        "mlp-some": (lambda: _mlp(4), "cross_entropy", (7,), 4, ["0.weight", "2.bias"]),
        "mlp-bias-only": (lambda: _mlp(4), "cross_entropy", (7,), 4, ["0.bias"]),
        "regression": (lambda: _mlp(2), "mse", (7,), 2, None),
        "binary": (lambda: _mlp(1), "binary_cross_entropy", (7,), 1, None),
        "sequence": (_Sequence, "cross_entropy", (4, 5), 3, None),
        "conv": (_Conv, "cross_entropy", (2, 5, 5), 4, None),
    }


CASES = _cases()


def _problem(case, l2=0.3, seed=0, cache_bytes=layer_ggn._CACHE_BYTES):
    make, loss, shape, k, names = CASES[case]
    torch.manual_seed(seed)
    net = make().to(DT)
    model = make_model(net, loss=loss)
    params = model.named_params()
    names = list(params) if names is None else names
    chosen = {q: params[q] for q in names}
    frozen = {q: v for q, v in params.items() if q not in chosen}

    def target(n):
        if loss == "cross_entropy":
            return torch.randint(0, k, (n,))
        if loss == "binary_cross_entropy":
            return torch.randint(0, 2, (n,)).to(DT)
        return torch.randn(n, k, dtype=DT)

    # two batches of different sizes and weights: the weighted mean of batch means
    batches = [((torch.randn(9, *shape, dtype=DT), target(9)), 2.0),
               ((torch.randn(5, *shape, dtype=DT), target(5)), 1.0)]
    _, outputs, output_loss = model.curvature_functions(frozen)
    ref = GGNOperator(outputs, output_loss, chosen, batches, l2=l2)
    plan = layer_ggn_plan(model, names)
    assert plan is not None
    op = LayerGGNOperator(model, chosen, batches, plan, ref, frozen=frozen, l2=l2,
                          cache_bytes=cache_bytes)
    return op, ref


@pytest.mark.parametrize("case", sorted(CASES))
def test_products_equal_ggn_operator(case):
    op, ref = _problem(case)
    V = torch.randn(3, op.p, dtype=DT)
    _assert_same(op.matvec(V), ref.matvec(V))
    _assert_same(op.matvec(V[1]), ref.matvec(V[1]))            # one vector, (p,)
    batch = op.batches[0][0]
    _assert_same(op.batch_matvec(batch, V), ref.batch_matvec(batch, V))
    assert len(op._factor_list) == 2 and not any(f is None for *_, f in op._factor_list)


@pytest.mark.parametrize("case", ["mlp", "sequence", "conv"])
def test_vector_chunks_and_cache_do_not_change_products(case, monkeypatch):
    op, ref = _problem(case, l2=torch.linspace(0.1, 1.0, _problem(case)[0].p, dtype=DT))
    V = torch.randn(7, op.p, dtype=DT)
    whole = op.matvec(V)
    _assert_same(whole, ref.matvec(V))
    monkeypatch.setattr(layer_ggn, "_CHUNK_ELEMENTS", 1)       # one vector per chunk
    fresh, _ = _problem(case, l2=ref.l2, cache_bytes=0)
    assert fresh._factor_list == []
    _assert_same(fresh.matvec(V), whole)
    assert fresh._factor_list == []                             # products keep nothing
    _assert_same(op.matvec(V), whole)                           # from the cache


def test_dense_matrix_equals_brute_force_jacobians():
    op, _ = _problem("mlp", l2=0.0)
    model, params = op.model, op.params
    total = 0.0
    dense = torch.zeros(op.p, op.p, dtype=DT)
    for (X, y), w in op.batches:
        def outputs(flat, X=X):
            from skdattri.func._grad import unflatten_like
            return model.forward(unflatten_like(flat, params), X)
        flat = torch.cat([v.reshape(-1) for v in params.values()])
        J = torch.autograd.functional.jacobian(outputs, flat)          # (n, k, p)
        out = outputs(flat)
        lam = model.loss_.output_hessians(out, y)
        dense += w * torch.einsum("nkp,nkl,nlq->pq", J, lam, J) / X.shape[0]
        total += w
    _assert_same(op.to_dense(), dense / total)


def test_batches_it_cannot_factor_fall_back(monkeypatch):
    monkeypatch.setattr(layer_ggn, "_MAX_OUTPUTS", 2)          # 4 outputs: too many
    op, ref = _problem("mlp")
    assert len(op._factor_list) == 2 and all(f is None for *_, f in op._factor_list)
    assert isinstance(op._fallback, GGNOperator)
    V = torch.randn(2, op.p, dtype=DT)
    _assert_same(op.matvec(V), ref.matvec(V))


def test_pickled_operator_keeps_its_factors():
    import pickle

    op, ref = _problem("mlp")
    V = torch.randn(2, op.p, dtype=DT)
    loaded = pickle.loads(pickle.dumps(op))
    assert len(loaded._factor_list) == 2 and not any(
        f is None for *_, f in loaded._factor_list)
    _assert_same(loaded.matvec(V), ref.matvec(V))


def test_plan_needs_every_parameter_in_a_supported_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)).to(DT)
    model = make_model(net, loss="cross_entropy")
    assert layer_ggn_plan(model, list(model.named_params())) is None
    assert layer_ggn_plan(model, ["0.weight", "2.weight", "2.bias"]) is not None
    set_config(grad_engine="vmap")
    try:
        assert layer_ggn_plan(model, ["0.weight"]) is None
    finally:
        set_config(grad_engine="auto")


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("solver", ["cg", "lissa", "arnoldi", "explicit", "nystrom"])
def test_influence_scores_do_not_depend_on_the_product_path(solver, digits, make_mlp,
                                                            monkeypatch):
    import skdattri._solvers as solvers

    products = []

    class Spy(LayerGGNOperator):
        def _mean_product(self, pairs, block):
            products.append(block.shape[0])
            return super()._mean_product(pairs, block)

    monkeypatch.setattr(solvers, "LayerGGNOperator", Spy)
    X, y, Xq, yq = digits
    kw = dict(solver=solver, hessian="ggn", regularization=0.1, max_iter=30, depth=40,
              n_components=20, random_state=0, batch_size=64)
    net = make_mlp()
    S_fast = InfluenceFunction(net, loss="cross_entropy", **kw).fit(
        X[:150], y[:150]).transform(Xq, yq)
    assert products                          # the factor products ran
    products.clear()
    set_config(grad_engine="vmap")
    try:
        S_ref = InfluenceFunction(net, loss="cross_entropy", **kw).fit(
            X[:150], y[:150]).transform(Xq, yq)
    finally:
        set_config(grad_engine="auto")
    assert not products
    # the same operator in another order of sums: rounding, amplified by the solves
    atol = 2**16 * np.finfo(np.float64).eps * float(np.abs(S_ref).max())
    np.testing.assert_allclose(S_fast, S_ref, rtol=0, atol=atol)
