"""Hessian / Gauss-Newton products against closed forms (float64)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer
from torch import nn
from torch.func import functional_call, jacrev

from skdattri.estimator_checks import assert_scores_close
from skdattri.func.hessian import (
    DenseOperator,
    GGNOperator,
    HessianOperator,
    LinearModelOperator,
    LinearOperator,
    ggn,
    ggn_vp,
    hessian,
    hvp,
)

DT = torch.float64


def _batches(X, y, batch_size):
    return [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(X), batch_size)]


@pytest.fixture(scope="module")
def binary_logreg():
    """Binary logistic regression on 120 breast-cancer rows: nn.Linear(30, 1)."""
    data = load_breast_cancer()
    X = data.data[:120]
    X = (X - X.mean(0)) / X.std(0)
    X = torch.tensor(X, dtype=DT)
    y = torch.tensor(data.target[:120], dtype=DT)
    torch.manual_seed(0)
    layer = nn.Linear(30, 1).to(DT)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss_fn(p, batch):
        logits = functional_call(layer, p, (batch[0],))[:, 0]
        return F.binary_cross_entropy_with_logits(logits, batch[1])

    return X, y, params, loss_fn


def _closed_form_hessian(X, params, l2):
    X1 = torch.cat([X, torch.ones(len(X), 1, dtype=DT)], 1)  # weight then bias
    prob = torch.sigmoid(X @ params["weight"][0] + params["bias"][0])
    H = X1.T @ (X1 * (prob * (1 - prob))[:, None]) / len(X)
    return H + torch.diag(torch.tensor([l2] * X.shape[1] + [0.0], dtype=DT))


@pytest.mark.parametrize("batch_size", [1, 13, 120])
def test_hessian_equals_logistic_closed_form(binary_logreg, batch_size):
    X, y, params, loss_fn = binary_logreg
    l2 = 0.3
    expected = _closed_form_hessian(X, params, l2)
    H = hessian(loss_fn, params, _batches(X, y, batch_size), l2={"weight": l2})
    assert H.shape == (31, 31)
    assert_scores_close(H, expected)


@pytest.mark.parametrize("batch_size", [1, 13, 120])
def test_hvp_equals_dense_hessian_product(binary_logreg, batch_size):
    X, y, params, loss_fn = binary_logreg
    expected_H = _closed_form_hessian(X, params, 0.3)
    V = torch.randn(5, 31, generator=torch.Generator().manual_seed(1), dtype=DT)
    HV = hvp(loss_fn, params, _batches(X, y, batch_size), V, l2={"weight": 0.3})
    assert_scores_close(HV, V @ expected_H)


def test_l2_forms_agree(binary_logreg):
    X, y, params, loss_fn = binary_logreg
    batches = _batches(X, y, 40)
    mask = torch.tensor([0.3] * 30 + [0.0], dtype=DT)
    V = torch.randn(3, 31, generator=torch.Generator().manual_seed(2), dtype=DT)
    plain = hvp(loss_fn, params, batches, V)
    by_name = hvp(loss_fn, params, batches, V, l2={"weight": 0.3})  # intercept unpenalised
    by_vector = hvp(loss_fn, params, batches, V, l2=mask)
    uniform = hvp(loss_fn, params, batches, V, l2=0.3)
    assert_scores_close(by_name, by_vector)
    assert_scores_close(by_name - plain, mask * V)
    assert_scores_close(uniform - plain, 0.3 * V)


def test_weighted_batches_are_a_weighted_mean(binary_logreg):
    X, y, params, loss_fn = binary_logreg
    b1, b2 = (X[:50], y[:50]), (X[50:], y[50:])
    H1 = hessian(loss_fn, params, [b1])
    H2 = hessian(loss_fn, params, [b2])
    H = hessian(loss_fn, params, [(b1, 3.0), (b2, 1.0)])
    assert_scores_close(H, (3 * H1 + H2) / 4)
    # a plain batch weighs its number of samples
    assert_scores_close(hessian(loss_fn, params, [b1, b2]), (50 * H1 + 70 * H2) / 120)


@pytest.fixture(scope="module")
def mlp():
    """A tanh MLP with cross-entropy, at a point where its Hessian is indefinite."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 4, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (40,), generator=gen)
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def output_fn(p, batch):
        return functional_call(net, p, (batch[0],))

    def output_loss_fn(out, batch):
        return F.cross_entropy(out, batch[1])

    def loss_fn(p, batch):
        return output_loss_fn(output_fn(p, batch), batch)

    return X, y, params, output_fn, output_loss_fn, loss_fn


def _brute_force_ggn(X, y, params, output_fn):
    """sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i / n with J from jacrev on flat params."""
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    flat = torch.cat([params[k].reshape(-1) for k in names])

    def f(theta):
        pieces = torch.split(theta, sizes)
        p = {k: t.reshape(s) for k, t, s in zip(names, pieces, shapes, strict=True)}
        return output_fn(p, (X, y))

    J = jacrev(f)(flat)  # (n, c, p)
    prob = torch.softmax(f(flat), 1)
    H_out = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", J, H_out, J) / len(X)


def test_ggn_matches_brute_force_and_is_psd(mlp):
    X, y, params, output_fn, output_loss_fn, loss_fn = mlp
    expected = _brute_force_ggn(X, y, params, output_fn)
    batches = _batches(X, y, 13)
    G = ggn(output_fn, output_loss_fn, params, batches)
    assert_scores_close(G, expected)
    V = torch.randn(4, G.shape[0], generator=torch.Generator().manual_seed(0), dtype=DT)
    assert_scores_close(ggn_vp(output_fn, output_loss_fn, params, batches, V), V @ expected)
    # the Hessian is indefinite at this point, the Gauss-Newton matrix is not
    H = hessian(loss_fn, params, batches)
    assert torch.linalg.eigvalsh(H)[0] < -1e-4
    assert torch.linalg.eigvalsh(G)[0] > -1e-12


@pytest.mark.parametrize("batch_size", [1, 13, 40])
def test_mlp_hvp_equals_dense_hessian(mlp, batch_size):
    X, y, params, _, _, loss_fn = mlp
    batches = _batches(X, y, batch_size)
    H = hessian(loss_fn, params, _batches(X, y, 40))
    V = torch.randn(3, H.shape[0], generator=torch.Generator().manual_seed(4), dtype=DT)
    assert_scores_close(hvp(loss_fn, params, batches, V), V @ H)
    assert_scores_close(hessian(loss_fn, params, batches), H)


def test_ggn_equals_hessian_for_linear_cross_entropy():
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(30, 4, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (30,), generator=gen)
    params = {
        "weight": torch.randn(3, 4, generator=gen, dtype=DT),
        "bias": torch.randn(3, generator=gen, dtype=DT),
    }

    def output_fn(p, batch):
        return batch[0] @ p["weight"].T + p["bias"]

    def output_loss_fn(out, batch):
        return F.cross_entropy(out, batch[1])

    def loss_fn(p, batch):
        return output_loss_fn(output_fn(p, batch), batch)

    batches = _batches(X, y, 7)
    V = torch.randn(6, 15, generator=gen, dtype=DT)
    assert_scores_close(ggn_vp(output_fn, output_loss_fn, params, batches, V),
                        hvp(loss_fn, params, batches, V))


def test_operators_vectorize_chunk_and_shapes(mlp):
    X, y, params, output_fn, output_loss_fn, loss_fn = mlp
    batches = _batches(X, y, 16)
    op = HessianOperator(loss_fn, params, batches, l2=0.1)
    looped = HessianOperator(loss_fn, params, batches, l2=0.1, vectorize=False)
    chunked = HessianOperator(loss_fn, params, batches, l2=0.1, chunk_size=2)
    assert isinstance(op, LinearOperator) and op.shape == (op.p, op.p) and op.p == 43
    V = torch.randn(5, op.p, generator=torch.Generator().manual_seed(6), dtype=DT)
    ref = op.matvec(V)
    assert_scores_close(looped.matvec(V), ref)
    assert_scores_close(chunked.matvec(V), ref)
    # a single vector keeps its shape; the operator is reusable (re-iterable batches)
    assert_scores_close(op(V[0]), ref[0])
    assert_scores_close(op.to_dense(), LinearOperator.to_dense(op))
    # per-batch products average to the full product (used by LiSSA)
    parts = [(op.batch_matvec(b, V), w) for b, w in op.iter_batches()]
    mean = sum(w * r for r, w in parts) / sum(w for _, w in parts)
    assert_scores_close(mean, ref)
    gop = GGNOperator(output_fn, output_loss_fn, params, batches, vectorize=False)
    assert_scores_close(gop.matvec(V),
                        GGNOperator(output_fn, output_loss_fn, params, batches).matvec(V))


def test_batches_sources(binary_logreg):
    X, y, params, loss_fn = binary_logreg
    batches = _batches(X, y, 30)
    V = torch.eye(31, dtype=DT)[:2]
    ref = hvp(loss_fn, params, batches, V)
    # a one-shot generator is fine for a one-shot product
    assert_scores_close(hvp(loss_fn, params, iter(batches), V), ref)
    # a callable returning a fresh iterator makes a reusable operator
    op = HessianOperator(loss_fn, params, lambda: iter(batches))
    assert_scores_close(op.matvec(V), ref)
    assert_scores_close(op.matvec(V), ref)
    with pytest.raises(TypeError, match="re-iterable"):
        HessianOperator(loss_fn, params, iter(batches))


def test_input_validation(binary_logreg):
    X, y, params, loss_fn = binary_logreg
    batches = _batches(X, y, 60)
    with pytest.raises(ValueError, match="shape"):
        hvp(loss_fn, params, batches, torch.zeros(2, 30, dtype=DT))
    with pytest.raises(ValueError, match="non-negative"):
        hvp(loss_fn, params, batches, torch.zeros(31, dtype=DT), l2=-1.0)
    with pytest.raises(ValueError, match="unknown"):
        hvp(loss_fn, params, batches, torch.zeros(31, dtype=DT), l2={"nope": 1.0})
    with pytest.raises(TypeError, match="dict"):
        hvp(loss_fn, [params["weight"]], batches, torch.zeros(31, dtype=DT))
    with pytest.raises(ValueError, match="empty"):
        hvp(loss_fn, params, [], torch.zeros(31, dtype=DT))
    with pytest.raises(ValueError, match="weight"):
        hvp(loss_fn, params, [((X, y), -1.0)], torch.zeros(31, dtype=DT))


def test_dense_operator():
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=DT)
    op = DenseOperator(A)
    V = torch.tensor([[1.0, -1.0]], dtype=DT)
    torch.testing.assert_close(op.matvec(V), V @ A)
    np.testing.assert_array_equal(op.to_dense().numpy(), A.numpy())
    with pytest.raises(ValueError, match="square"):
        DenseOperator(torch.zeros(2, 3))


def _ce(Z, t):
    return F.cross_entropy(Z, t, reduction="none")


@pytest.fixture(scope="module")
def softmax_regression():
    """Softmax regression (7 features, 4 classes, 53 rows) in weighted batches of 10."""
    gen = torch.Generator().manual_seed(11)
    X = torch.randn(53, 7, generator=gen, dtype=DT)
    y = torch.randint(0, 4, (53,), generator=gen)
    W = torch.randn(4, 7, generator=gen, dtype=DT)
    b = torch.randn(4, generator=gen, dtype=DT)
    batches = [((X[i:i + 10], y[i:i + 10]), 1.0 + (i // 10) % 3) for i in range(0, 53, 10)]
    return X, y, W, b, batches


@pytest.mark.parametrize("names", [("w", "b"), ("b", "w"), ("w",), ("b",)])
@pytest.mark.parametrize("small_chunks", [False, True])
def test_linear_model_dense_equals_autograd_hessian(softmax_regression, names, small_chunks,
                                                     monkeypatch):
    import skdattri.func._linear_dense as dense_module

    X, y, W, b, batches = softmax_regression
    if small_chunks:  # several row chunks per batch and column pairs in groups
        monkeypatch.setattr(dense_module, "_DENSE_CHUNK_ELEMENTS", 40)
        monkeypatch.setattr(dense_module, "_DENSE_MIN_ROWS", 3)
    full = {"w": W, "b": b}
    params = {n: full[n] for n in names}
    l2 = {n: 0.1 * (i + 1) for i, n in enumerate(names)}
    op = LinearModelOperator(_ce, params, batches, weight=W, bias=b, weight_name="w",
                             bias_name="b", l2=l2)

    def loss_fn(p, batch):
        q = {**full, **p}
        return _ce(batch[0] @ q["w"].T + q["b"], batch[1]).mean()

    ref = hessian(loss_fn, params, batches, l2=l2)
    dense = op.to_dense()
    assert dense.shape == (op.p, op.p)
    assert_scores_close(dense, ref)
    assert torch.equal(dense, dense.T)  # exactly symmetric
    # the data term has off-diagonal mass (not a diagonal that passes by accident)
    assert float((ref - torch.diag(torch.diagonal(ref))).abs().max()) > 1e-2
    # its products (weight only, bias only, both, either order) against the same matrix
    V = torch.randn(5, op.p, generator=torch.Generator().manual_seed(1), dtype=DT)
    assert_scores_close(op.matvec(V), V @ ref)
    assert_scores_close(op.matvec(V[0]), ref @ V[0])


def test_linear_model_dense_of_any_output_hessians(softmax_regression, monkeypatch):
    """A non-symmetric (and indefinite) output Hessian: the symmetric part of the
    operator its products define, as the generic column-by-column ``to_dense``."""
    import skdattri.func._linear_dense as dense_module

    X, y, W, b, batches = softmax_regression
    gen = torch.Generator().manual_seed(3)
    tables = {}

    def output_hessians(Z, t):
        key = Z.shape[0], float(Z.sum())
        if key not in tables:
            tables[key] = torch.randn(Z.shape[0], 4, 4, generator=gen, dtype=DT)
        return tables[key]

    op = LinearModelOperator(_ce, {"w": W, "b": b}, batches, weight=W, bias=b,
                             weight_name="w", bias_name="b", output_hessian_fn=output_hessians)
    ref = LinearOperator.to_dense(op)
    assert_scores_close(op.to_dense(), ref)
    monkeypatch.setattr(dense_module, "_DENSE_CHUNK_ELEMENTS", 50)
    monkeypatch.setattr(dense_module, "_DENSE_MIN_ROWS", 4)
    assert_scores_close(op.to_dense(), ref)


@pytest.mark.parametrize("names", [("w", "b"), ("b", "w"), ("w",)])
@pytest.mark.parametrize("l2", [None, 0.3, "vector"])
def test_linear_model_native_rows_products_and_lissa(softmax_regression, names, l2,
                                                     monkeypatch):
    """The rows' own layout: a lossless round trip, the same batch products, and LiSSA
    through it equal to LiSSA on the flat rows (float64)."""
    from skdattri.func.hessian import LinearModelOperator as LMO
    from skdattri.func.ihvp import LissaIHVP

    X, y, W, b, batches = softmax_regression
    full = {"w": W, "b": b}
    params = {n: full[n] for n in names}
    if l2 == "vector":
        l2 = {n: 0.1 * (i + 1) for i, n in enumerate(names)}
    op = LMO(_ce, params, batches, weight=W, bias=b, weight_name="w", bias_name="b", l2=l2)
    native = op.native_rows()
    V = torch.randn(6, op.p, generator=torch.Generator().manual_seed(2), dtype=DT)
    Vn = native.to_native(V)
    assert Vn.shape == (6, 4, W.shape[1] + ("b" in names)) and Vn.is_contiguous()
    assert torch.equal(native.from_native(Vn), V)
    for batch, _ in op.iter_batches():
        assert_scores_close(native.from_native(native.batch_matvec(batch, Vn)),
                            op.batch_matvec(batch, V))
    lissa = LissaIHVP(damping=0.05, depth=40, random_state=0).fit(op)
    X_native = lissa.solve(V)
    monkeypatch.setattr(LMO, "native_rows", lambda self: None)
    assert_scores_close(X_native, lissa.solve(V))
    assert float(X_native.abs().max()) > 0


def test_linear_model_native_rows_needs_the_weight(softmax_regression):
    X, y, W, b, batches = softmax_regression
    op = LinearModelOperator(_ce, {"b": b}, batches, weight=W, bias=b, weight_name="w",
                             bias_name="b")
    assert op.native_rows() is None
