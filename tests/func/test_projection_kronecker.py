"""Kronecker-factored projections (LoGra, FactGraSS) against hand-built references, float64."""

import math
import pickle

import pytest
import torch
from torch import nn

from skdattri.func.hooks import LayerCapture, find_layers
from skdattri.func.projection import (
    DenseProjector,
    KroneckerProjector,
    LayerwiseKroneckerProjector,
    layer_shapes,
    make_kronecker_projector,
)

EPS = torch.finfo(torch.float64).eps


def _matrix(P):
    """A projector's (n_features, out_dim) matrix, by projecting the identity."""
    return P(torch.eye(P.n_features, dtype=torch.float64))


def _tol(G, K):
    """Rounding bound for ``G @ K`` computed in another order: eps * sqrt(terms) * magnitude."""
    return 16 * EPS * math.sqrt(K.shape[0]) * (G.abs() @ K.abs()).max().item()


def _layer_data(T, seed=0):
    """A Linear layer with a bias, its capture factors and per-sample gradients by autograd."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X = torch.randn(7, T, 5, dtype=torch.float64) if T > 1 else torch.randn(7, 5,
                                                                          dtype=torch.float64)

    def losses(x):
        out = net(x)
        return (out**2).reshape(out.shape[0], -1).sum(1)

    with LayerCapture(find_layers(net, ["0"])) as capture:
        ((a, g),) = capture.collect(losses(X).sum()).values()
    layer = net[0]
    grads = []
    for i in range(len(X)):
        dW, db = torch.autograd.grad(losses(X[i : i + 1]).sum(), [layer.weight, layer.bias])
        grads.append(torch.cat([dW, db[:, None]], dim=1))  # bias = last input column
    G = torch.stack(grads)  # (n, d_out, d_in + 1)
    return a, g, G


@pytest.mark.parametrize("T", [1, 6])
def test_logra_equals_kron_of_the_factor_matrices(T):
    a, g, G = _layer_data(T)
    n, d_out, d_in = G.shape
    assert a.shape == (n, T, d_in) and g.shape == (n, T, d_out)
    P = make_kronecker_projector(d_out, d_in, 6, factor_dims=(2, 3), random_state=0,
                                 dtype=torch.float64)
    assert P.out_dim == 6 and P.n_features == d_out * d_in
    R_in, R_out = _matrix(P.in_projector), _matrix(P.out_projector)  # (d_in, 3), (d_out, 2)
    # row-major vec (torch's flattening of weight): vec(P_out^T G P_in) = kron(P_out, P_in)^T vec(G)
    g_row = G.reshape(n, -1)
    K = torch.kron(R_out, R_in)
    expected = g_row @ K
    torch.testing.assert_close(P.project_factors(a, g), expected, rtol=0, atol=_tol(g_row, K))
    torch.testing.assert_close(P(g_row), expected, rtol=0, atol=_tol(g_row, K))
    torch.testing.assert_close(P(G), expected, rtol=0, atol=_tol(g_row, K))  # (n, d_out, d_in)
    # the same coordinates as the paper writes them: kron(P_in, P_out) @ vec(G), column-major
    g_col = G.transpose(1, 2).reshape(n, -1)
    col = (torch.kron(R_in.T, R_out.T) @ g_col.T).T  # ordered (k_in, k_out)
    torch.testing.assert_close(col.reshape(n, 3, 2).transpose(1, 2).reshape(n, -1), expected,
                               rtol=0, atol=_tol(g_row, K))
    # and the projected gradient is P_out^T G_i P_in
    torch.testing.assert_close(
        (R_out.T @ G @ R_in).reshape(n, -1), expected, rtol=0, atol=_tol(g_row, K))


def test_factorgrass_equals_masks_outer_product_sjlt_by_hand():
    a, g, G = _layer_data(4)
    n, d_out, d_in = G.shape
    P = make_kronecker_projector(d_out, d_in, 5, proj_type="grass", factor_dims=(3, 4),
                                 n_nonzero=2, random_state=1, dtype=torch.float64)
    M_in, M_out, S = P.in_projector, P.out_projector, P.post_projector
    assert (M_in.out_dim, M_out.out_dim, S.n_features, S.out_dim) == (4, 3, 12, 5)
    # hand-written reference: mask each factor (gather + sqrt(d / k) scale), sum over t
    # of the outer products, flatten row-major (k_out, k_in), then the SJLT matrix
    a_m = a[..., M_in.index] * math.sqrt(d_in / 4)
    g_m = g[..., M_out.index] * math.sqrt(d_out / 3)
    outer = torch.zeros(n, 3, 4, dtype=torch.float64)
    for t in range(a.shape[1]):
        outer += g_m[:, t, :, None] * a_m[:, t, None, :]
    S_mat = _matrix(S)
    assert ((S_mat != 0).sum(1) == 2).all()
    expected = outer.reshape(n, -1) @ S_mat
    tol = _tol(outer.reshape(n, -1), S_mat) + 16 * EPS * (G.abs().max() * d_in * d_out).item()
    torch.testing.assert_close(P.project_factors(a, g), expected, rtol=0, atol=tol)
    torch.testing.assert_close(P(G.reshape(n, -1)), expected, rtol=0, atol=tol)
    # the selective variant fits its factor masks on the factors it is fed
    Q = make_kronecker_projector(d_out, d_in, 5, proj_type="selective_grass",
                                 factor_dims=(3, 4), dtype=torch.float64)
    assert Q.requires_fit
    Q.partial_fit(a[:3], g[:3]).partial_fit(a[3:], g[3:]).finalize()
    top_in = torch.argsort((a**2).mean((0, 1)), descending=True, stable=True)[:4]
    assert Q.in_projector.index_.tolist() == sorted(top_in.tolist())
    torch.testing.assert_close(Q.project_factors(a, g), Q(G), rtol=0, atol=tol)


def test_default_factor_dims():
    P = make_kronecker_projector(128, 785, 4096, random_state=0)
    assert (P.out_projector.out_dim, P.in_projector.out_dim, P.out_dim) == (64, 64, 4096)
    assert make_kronecker_projector(10, 129, 24).in_projector.out_dim == 6  # 4 x 6
    # masks are capped by the factor sizes; FactGraSS's product stays <= mask_dim
    M = make_kronecker_projector(10, 129, 64, proj_type="random_mask")
    assert (M.out_projector.out_dim, M.in_projector.out_dim) == (8, 8)
    F = make_kronecker_projector(10, 129, 64, proj_type="grass", random_state=0)
    k_out, k_in = F.out_projector.out_dim, F.in_projector.out_dim
    assert k_out == 10 and k_in * k_out <= 256 and F.out_dim == 64
    with pytest.raises(ValueError, match="must agree"):
        F.project_factors(torch.zeros(2, 3, 129), torch.zeros(2, 4, 10))
    with pytest.raises(ValueError, match=r"shape \(n, T, 129\)"):
        F.project_factors(torch.zeros(2, 3, 128), torch.zeros(2, 3, 10))
    with pytest.raises(ValueError, match="k_out \\* k_in"):
        KroneckerProjector(DenseProjector(4, 2), DenseProjector(3, 2), DenseProjector(5, 2))


def test_layerwise_kronecker_from_a_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    layers = find_layers(net)
    shapes = layer_shapes(layers)
    assert shapes == [(5, 7), (3, 6)]
    P = LayerwiseKroneckerProjector(shapes, 4, random_state=0, dtype=torch.float64)
    assert P.out_dim == 8 and P.n_features == 35 + 18
    X = torch.randn(9, 6, dtype=torch.float64)
    with LayerCapture(layers) as capture:
        factors = capture.collect((net(X) ** 2).sum())
    Y = P.project_factors(factors)
    blocks = [torch.einsum("nto,nti->noi", g, a).reshape(9, -1) for a, g in factors.values()]
    flat = torch.cat(blocks, dim=1)
    torch.testing.assert_close(P(flat), Y, rtol=0, atol=64 * EPS * Y.abs().max().item())
    for sub, block, i in zip(P.projectors_, blocks, range(2)):
        assert torch.equal(Y[:, 4 * i : 4 * i + 4], sub.project_factors(*list(factors.values())[i]))
        K = torch.kron(_matrix(sub.out_projector), _matrix(sub.in_projector))
        torch.testing.assert_close(Y[:, 4 * i : 4 * i + 4], block @ K, rtol=0,
                                   atol=_tol(block, K))
    assert len({sub.seed_ for sub in P.projectors_}) == 2
    # in and out factors of one layer get different matrices even with equal sizes
    Q = make_kronecker_projector(6, 6, 9, random_state=0, dtype=torch.float64)
    assert not torch.equal(_matrix(Q.in_projector), _matrix(Q.out_projector))
    with pytest.raises(ValueError, match="for 2 layers, got 1"):
        P.project_factors([next(iter(factors.values()))])


@pytest.mark.parametrize("proj_type", ["gaussian", "grass"])
def test_kronecker_pickle_to_and_batches(proj_type):
    a, g, G = _layer_data(3)
    n, d_out, d_in = G.shape
    P = make_kronecker_projector(d_out, d_in, 6, proj_type=proj_type, random_state=2,
                                 dtype=torch.float64)
    Y = P.project_factors(a, g)
    Q = pickle.loads(pickle.dumps(P))
    assert torch.equal(Q.project_factors(a, g), Y)
    assert P.to("cpu") is P and torch.equal(P.project_factors(a, g), Y)
    assert P.seed_ == 2 and P.proj_type == proj_type
    parts = torch.cat([P.project_factors(a[i : i + 2], g[i : i + 2]) for i in range(0, n, 2)])
    torch.testing.assert_close(parts, Y, rtol=0, atol=16 * EPS * Y.abs().max().item())
    P.to(dtype=torch.float32)
    torch.testing.assert_close(P.project_factors(a, g).double(), Y, rtol=1e-5,
                               atol=1e-5 * Y.abs().max().item())
