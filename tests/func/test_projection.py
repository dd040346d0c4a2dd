"""Tests of the random projection kit (skdattri.func.projection)."""

import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from skdattri.estimator_checks import assert_scores_close
from skdattri.func import projection as proj
from skdattri.func.projection import (
    DenseProjector,
    LayerwiseProjector,
    SJLTProjector,
    make_projector,
)
from skdattri.func.projection import _base as proj_base

CONFIGS = [
    pytest.param({"proj_type": "gaussian"}, id="gaussian"),
    pytest.param({"proj_type": "rademacher"}, id="rademacher"),
    pytest.param({"proj_type": "sjlt", "n_nonzero": 1}, id="sjlt1"),
    pytest.param({"proj_type": "sjlt", "n_nonzero": 8}, id="sjlt8"),
    pytest.param({"proj_type": "gaussian", "layer_sizes": [300, 100, 1600]}, id="layer-gauss"),
    pytest.param({"proj_type": "sjlt", "n_nonzero": 2, "layer_sizes": [1000, 1000]},
                 id="layer-sjlt"),
]


def _matrix(P, dtype=torch.float64):
    """The (n_features, out_dim) matrix of a projector, by projecting the identity."""
    return P(torch.eye(P.n_features, dtype=dtype))


def test_hash_is_splitmix64_on_int64_tensors():
    # int64 wrap-around and logical shifts must reproduce the 64-bit reference
    counters = [0, 1, 2, 12345, 2**31 - 1, 2**40 + 7, 2**62 + 3]
    key = proj._derive_key(42, 1)
    got = proj._hash_(torch.tensor(counters, dtype=torch.int64), key).tolist()
    assert got == [proj._splitmix64_py(c, key) for c in counters]


@pytest.mark.parametrize("config", CONFIGS)
def test_inner_products_within_jl_bound(config):
    # For unit x, y: E<Px, Py> = <x, y>, sd <= sqrt(2 / k) = 0.031 for k = 2048.
    # Over 40 vectors (820 pairs + norms) the largest error is about 4 sd; eps = 0.25
    # leaves a margin of 8 sd.
    rng = np.random.RandomState(0)
    n, p, k, eps = 40, 2000, 2048, 0.25
    base = rng.randn(n, p)
    base[n // 2 :] = base[: n // 2] + 0.5 * rng.randn(n // 2, p)  # correlated pairs
    base[:5, :10] *= 30.0  # a few spiky vectors
    X = torch.from_numpy(base / np.linalg.norm(base, axis=1, keepdims=True))
    # per layer: the error is the sum of the per-layer errors, with variance
    # sum_l 2 |x_l|^2 |y_l|^2 / k_l <= 2 / k_l; each layer gets k / n_layers outputs,
    # which keeps the bound for vectors spread over the layers
    n_layers = len(config.get("layer_sizes", [0]))
    P = make_projector(p, k // n_layers, random_state=0, dtype=torch.float64, **config)
    assert P.out_dim == k // n_layers * n_layers
    Y = P(X)
    err = (Y @ Y.T - X @ X.T).abs()
    assert err.max().item() < eps
    # and it is a genuine random projection, not the identity on a subset
    assert err.max().item() > 1e-3


@pytest.mark.parametrize("proj_type", ["gaussian", "rademacher"])
def test_dense_entries_have_the_stated_distribution(proj_type):
    p, k = 500, 2001  # odd k: the last Box-Muller pair is cut
    P = make_projector(p, k, proj_type=proj_type, random_state=3, dtype=torch.float64)
    R = _matrix(P).numpy()
    # N(0, 1/k) or +-1/sqrt(k): mean 0, variance 1/k (1e6 entries: sd of the
    # variance estimate is sqrt(2/N) = 0.0014 relative)
    assert abs(R.mean()) * math.sqrt(k) < 5 / math.sqrt(R.size)
    assert abs(R.var() * k - 1) < 0.01
    if proj_type == "rademacher":
        np.testing.assert_array_equal(np.abs(R), 1 / math.sqrt(k))
        assert abs((R > 0).mean() - 0.5) < 0.005
    else:
        z = R * math.sqrt(k)
        assert abs(np.mean(z**4) - 3) < 0.05  # Gaussian kurtosis
        assert np.abs(z).max() < 7


@pytest.mark.parametrize("n_nonzero", [1, 3, 8])
def test_sjlt_structure(n_nonzero):
    p, k = 400, 64
    P = make_projector(p, k, proj_type="sjlt", n_nonzero=n_nonzero, random_state=0,
                       dtype=torch.float64)
    R = _matrix(P).numpy()
    nz = R != 0
    np.testing.assert_array_equal(nz.sum(1), n_nonzero)
    np.testing.assert_allclose(np.abs(R[nz]), 1 / math.sqrt(n_nonzero))
    # one non-zero in each of the n_nonzero contiguous blocks of outputs
    starts = [(r * k) // n_nonzero for r in range(n_nonzero + 1)]
    for r in range(n_nonzero):
        np.testing.assert_array_equal(nz[:, starts[r] : starts[r + 1]].sum(1), 1)
    # both signs, and every output coordinate used
    assert 0.4 < (R[nz] > 0).mean() < 0.6
    assert nz.any(0).all()


@pytest.mark.parametrize("config", CONFIGS)
def test_same_projection_in_any_batch_order(config):
    p = 2000
    G = torch.randn(37, p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    P = make_projector(p, 24, random_state=7, dtype=torch.float64, **config)
    full = P(G)
    # a fresh projector from the same random_state gives the same result
    again = make_projector(p, 24, random_state=7, dtype=torch.float64, **config)
    assert torch.equal(again(G), full)
    # shuffled rows in uneven batches
    perm = torch.randperm(len(G), generator=torch.Generator().manual_seed(1))
    parts = []
    for chunk in torch.split(perm, [1, 5, 11, 3, 17]):
        parts.append((chunk, P(G[chunk])))
    out = torch.empty_like(full)
    for chunk, res in parts:
        out[chunk] = res
    if config["proj_type"] == "sjlt":
        assert torch.equal(out, full)  # index_add_ in a fixed order: bitwise
    else:
        assert_scores_close(out, full)


def test_random_matrix_is_bitwise_independent_of_block_size(monkeypatch):
    P = make_projector(300, 257, random_state=5, dtype=torch.float64)
    ref = P._rows(0, 300)
    monkeypatch.setattr(proj_base, "_WORK_BYTES", 8 * 257 * 7)  # 7 float64 rows per block
    assert P._block_rows() == 7
    assert torch.equal(P._build_matrix(), ref)
    assert torch.equal(torch.cat([P._rows(i, min(i + 13, 300)) for i in range(0, 300, 13)]), ref)


@pytest.mark.parametrize("random_state", [0, 1, 123456789])
@pytest.mark.parametrize("config", CONFIGS)
def test_different_random_state_differs(config, random_state):
    G = torch.randn(4, 2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    P = make_projector(2000, 32, random_state=random_state, dtype=torch.float64, **config)
    Q = make_projector(2000, 32, random_state=random_state + 1, dtype=torch.float64, **config)
    A, B = P(G), Q(G)
    assert (A - B).abs().max() > 0.1 * A.abs().max()


def test_random_state_resolution():
    np.random.seed(0)
    a = make_projector(50, 8, random_state=None)
    np.random.seed(0)
    b = make_projector(50, 8, random_state=None)
    assert isinstance(a.seed_, int) and a.seed_ == b.seed_
    # a RandomState draws a seed: two projectors from one RandomState differ,
    # the same fresh RandomState reproduces them
    rs = np.random.RandomState(3)
    c, d = make_projector(50, 8, random_state=rs), make_projector(50, 8, random_state=rs)
    assert c.seed_ != d.seed_
    assert make_projector(50, 8, random_state=np.random.RandomState(3)).seed_ == c.seed_
    assert make_projector(50, 8, random_state=11).seed_ == 11
    G = torch.randn(3, 50)
    assert torch.equal(make_projector(50, 8, random_state=c.seed_)(G), c(G))
    with pytest.raises((TypeError, ValueError)):
        make_projector(50, 8, random_state="zero")


def test_sjlt_never_materialises_a_dense_matrix():
    # dense, this would be a 2e6 x 4096 float32 matrix: 32 GB
    p, k = 2_000_000, 4096

    class MaxNumel(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    MaxNumel.largest = max(MaxNumel.largest, t.numel())
            return out

    G = torch.zeros(2, p)
    cols = torch.tensor([0, 17, 999_999, 1_999_999])
    G[0, cols] = torch.tensor([1.0, -2.0, 3.0, 0.5])
    G[1, 5] = 4.0
    with MaxNumel():
        P = make_projector(p, k, proj_type="sjlt", random_state=0)
        Y = P(G)
    assert MaxNumel.largest <= 2 * p  # the size of the input; p * k would be 8e9
    held = {name: t for name, t in vars(P).items() if isinstance(t, torch.Tensor)}
    assert {name: tuple(t.shape) for name, t in held.items()} == {
        "_index": (p, 1), "_sign": (p, 1)}
    assert held["_index"].dtype == torch.int32
    # the result is the sum of the hashed, signed input coordinates
    idx, sign = P._index[:, 0].long(), P._sign[:, 0]
    expected = torch.zeros(2, k)
    expected[0].index_add_(0, idx[cols], G[0, cols] * sign[cols])
    expected[1, idx[5]] += 4.0 * sign[5]
    assert torch.equal(Y, expected)


@pytest.mark.parametrize("proj_type", ["gaussian", "rademacher"])
def test_blockwise_equals_cached_matrix(proj_type, monkeypatch):
    p, k = 300, 257
    G = torch.randn(9, p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cached = make_projector(p, k, proj_type=proj_type, random_state=1, dtype=torch.float64)
    assert cached.cached
    ref = cached(G)
    # Gaussian entries are kept as floats, Rademacher ones packed (ceil(257 / 64) words)
    stored = (p, k) if proj_type == "gaussian" else (p, 5 * 8)
    assert cached._matrix is not None and cached._matrix.shape == stored
    monkeypatch.setattr(proj_base, "_WORK_BYTES", 8 * k * 16)  # 16 rows per block: 19 blocks
    blockwise = make_projector(p, k, proj_type=proj_type, random_state=1,
                               dtype=torch.float64, max_dense_bytes=cached._stored_bytes() - 1)
    assert not blockwise.cached
    out = blockwise(G)
    assert blockwise._matrix is None  # never held whole
    assert_scores_close(out, ref)
    assert torch.equal(blockwise._build_matrix(), cached.matrix())


def test_layerwise_projection():
    sizes, k = [30, 70, 200], 16
    G = torch.randn(5, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    P = make_projector(300, k, layer_sizes=sizes, random_state=0, dtype=torch.float64)
    assert isinstance(P, LayerwiseProjector) and P.out_dim == 48
    Y = P(G)
    # each layer is projected on its own, with its own matrix
    offsets = [0, 30, 100, 300]
    for i, sub in enumerate(P.projectors_):
        assert torch.equal(Y[:, i * k : (i + 1) * k], sub(G[:, offsets[i] : offsets[i + 1]]))
    assert len({sub.seed_ for sub in P.projectors_}) == 3
    H = G.clone()
    H[:, 30:100] += 1.0  # change layer 1 only
    Z = P(H)
    assert torch.equal(Z[:, :k], Y[:, :k]) and torch.equal(Z[:, 2 * k :], Y[:, 2 * k :])
    assert not torch.equal(Z[:, k : 2 * k], Y[:, k : 2 * k])
    # two equal-sized layers get different matrices
    Q = make_projector(100, k, layer_sizes=[50, 50], random_state=0, dtype=torch.float64)
    X = torch.randn(3, 50, dtype=torch.float64)
    out = Q(torch.cat([X, X], dim=1))
    assert not torch.allclose(out[:, :k], out[:, k:])
    # the dense budget is spent in layer order; blockwise layers give the same result
    budget = 30 * k * 8 + 70 * k * 8
    R = make_projector(300, k, layer_sizes=sizes, random_state=0, dtype=torch.float64,
                       max_dense_bytes=budget)
    assert [sub.cached for sub in R.projectors_] == [True, True, False]
    assert_scores_close(R(G), Y)
    with pytest.raises(ValueError, match="layer_sizes sum to"):
        make_projector(300, k, layer_sizes=[100, 100])


@pytest.mark.parametrize("config", CONFIGS)
def test_float64_and_float32_paths_agree(config):
    G = torch.randn(6, 2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    P64 = make_projector(2000, 32, random_state=0, dtype=torch.float64, **config)
    P32 = make_projector(2000, 32, random_state=0, dtype=torch.float32, **config)
    Y64, Y32 = P64(G), P32(G)
    assert Y64.dtype == torch.float64 and Y32.dtype == torch.float32
    assert_scores_close(Y32, Y64)  # float32 round-off of the largest entry
    # to(dtype=...) regenerates the same projection in the new precision
    P32.to(dtype=torch.float64)
    assert_scores_close(P32(G), Y64)


@pytest.mark.parametrize("config", CONFIGS)
def test_pickle_drops_caches_and_reproduces(config):
    G = torch.randn(4, 2000)
    P = make_projector(2000, 256, random_state=0, **config)
    Y = P(G)
    data = pickle.dumps(P)
    assert len(data) < 100_000  # the cached matrix / index tensors are not pickled
    Q = pickle.loads(data)
    assert torch.equal(Q(G), Y)
    assert P.to("cpu") is P and torch.equal(P(G), Y)


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a machine without CUDA")
def test_projector_saved_on_gpu_loads_on_cpu():
    P = make_projector(100, 8, random_state=0)
    G = torch.randn(2, 100)
    Y = P(G)
    P._clear_cache()
    P.device = torch.device("cuda")  # as if built on a GPU
    with pytest.warns(UserWarning, match="CUDA is not available"):
        Q = pickle.loads(pickle.dumps(P))
    assert Q.device == torch.device("cpu")
    assert torch.equal(Q(G), Y)


def test_input_validation():
    P = make_projector(10, 4, random_state=0)
    with pytest.raises(ValueError, match="2-D"):
        P(torch.zeros(10))
    with pytest.raises(ValueError, match="Expected 10 features"):
        P(torch.zeros(3, 11))
    assert P(np.ones((2, 10))).shape == (2, 4)  # array-likes are converted
    with pytest.raises(ValueError, match="proj_type"):
        make_projector(10, 4, proj_type="fjlt")
    with pytest.raises(ValueError, match="n_nonzero"):
        make_projector(10, 4, proj_type="sjlt", n_nonzero=5)
    with pytest.raises(ValueError, match="proj_dim"):
        make_projector(10, 0)
    with pytest.raises(TypeError, match="dtype"):
        make_projector(10, 4, dtype=torch.int64)
    assert isinstance(make_projector(10, 4), DenseProjector)
    assert isinstance(make_projector(10, 4, proj_type="sjlt"), SJLTProjector)
    assert "n_nonzero=2" in repr(make_projector(10, 4, proj_type="sjlt", n_nonzero=2))


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS)
def test_cuda_matches_cpu(config):
    G = torch.randn(16, 2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cpu = make_projector(2000, 64, random_state=0, dtype=torch.float64, **config)
    gpu = make_projector(2000, 64, random_state=0, dtype=torch.float64, device="cuda", **config)
    ref = cpu(G)
    out = gpu(G)
    assert out.device.type == "cuda"
    assert_scores_close(out.cpu(), ref, rtol=1e-10)
    if config["proj_type"] != "gaussian":  # integer hashing: the same matrix bitwise
        torch.testing.assert_close(_matrix(gpu).cpu(), _matrix(cpu), rtol=0, atol=0)
    # a projector fitted on the GPU moves to the CPU with the same projection
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_scores_close(gpu.to("cpu")(G), ref, rtol=1e-10)
