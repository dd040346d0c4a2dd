"""Masks and GraSS (mask then SJLT) of skdattri.func.projection, in float64."""

import math
import pickle

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

from skdattri.func import projection as proj
from skdattri.func.projection import (
    ComposedProjector,
    RandomMaskProjector,
    SelectiveMaskProjector,
    SJLTProjector,
    make_projector,
)
from skdattri.func.projection import _random as proj_random

EPS = torch.finfo(torch.float64).eps
_U64 = (1 << 64) - 1


def _randn(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _mask_index_ref(key, n, k):
    """The k positions of smallest SplitMix64 hash (pure Python), ascending."""
    return sorted(sorted(range(n), key=lambda i: proj._splitmix64_py(i, key))[:k])


def _sjlt_matrix_ref(key, p, k, s):
    """The (p, k) SJLT matrix from the pure-Python hash: bucket r of input i."""
    R = np.zeros((p, k))
    starts = [(r * k) // s for r in range(s + 1)]
    for i in range(p):
        for r in range(s):
            z = proj._splitmix64_py(i * s + r, key) & _U64
            col = (z >> 32) % (starts[r + 1] - starts[r]) + starts[r]
            R[i, col] = (1.0 if z & 1 else -1.0) / math.sqrt(s)
    return torch.from_numpy(R)


def _tol(*factors):
    """Rounding bound of a product chain: eps * entries summed * magnitude."""
    mag = factors[0].abs()
    for F in factors[1:]:
        mag = mag @ F.abs()
    return 8 * EPS * math.prod(F.shape[0] for F in factors[1:]) ** 0.5 * mag.max().item()


def test_random_mask_keeps_exactly_the_chosen_coordinates():
    p, k = 1000, 37
    P = make_projector(p, k, proj_type="random_mask", random_state=4, dtype=torch.float64)
    assert isinstance(P, RandomMaskProjector) and P.out_dim == k
    idx = P.index
    assert idx.dtype == torch.int64 and idx.shape == (k,)
    assert torch.equal(idx, torch.unique(idx))  # distinct and ascending
    G = _randn(9, p)
    scale = math.sqrt(p / k)
    assert P.scale == scale
    assert torch.equal(P(G), G[:, idx] * scale)  # bitwise: a gather and one product
    # as a matrix: one entry `scale` per kept coordinate, nothing else
    R = P(torch.eye(p, dtype=torch.float64))
    assert torch.equal(R.nonzero()[:, 0], idx) and torch.equal(R.nonzero()[:, 1], torch.arange(k))
    # batches and rows are independent
    assert torch.equal(P(G[3:5]), P(G)[3:5])


def test_mask_index_is_a_pure_function_of_seed_and_position(monkeypatch):
    # the device-independent definition: the k smallest 64-bit hashes of the positions
    p, k = 600, 25
    P = RandomMaskProjector(p, k, random_state=11)
    ref = _mask_index_ref(P._key, p, k)
    assert P.index.tolist() == ref
    # the chunked scan (here 13 chunks of 48 positions) finds the same subset
    monkeypatch.setattr(proj_random, "_CHUNK", 3)
    assert proj_random._smallest_hashes(P._key, p, k, "cpu").tolist() == ref
    # same seed, same subset; the subset depends on the seed and on (p, k)
    assert RandomMaskProjector(p, k, random_state=11).index.tolist() == ref
    assert RandomMaskProjector(p, k, random_state=12).index.tolist() != ref
    assert set(RandomMaskProjector(p, k + 1, random_state=11).index.tolist()) != set(ref)


def test_sjlt_index_and_sign_are_a_pure_function_of_seed_and_position():
    p, k, s = 50, 12, 3
    P = SJLTProjector(p, k, n_nonzero=s, random_state=2, dtype=torch.float64)
    torch.testing.assert_close(P(torch.eye(p, dtype=torch.float64)),
                               _sjlt_matrix_ref(P._key, p, k, s), rtol=0, atol=0)


def test_random_mask_inner_products_are_unbiased():
    # E<Px, Py> = <x, y> over the draw of the mask. With z = x * y the estimator is
    # p * (mean of k draws without replacement from z): variance
    # p^2 var(z) / k * (p - k) / (p - 1). Its mean over S seeds is within 5 sd.
    p, k, S = 400, 40, 400
    rng = np.random.RandomState(0)
    x = torch.from_numpy(rng.randn(p))
    y = x + torch.from_numpy(rng.randn(p))
    z = (x * y).numpy()
    sd = math.sqrt(p**2 * z.var() / k * (p - k) / (p - 1) / S)
    est = []
    for seed in range(S):
        P = RandomMaskProjector(p, k, random_state=seed, dtype=torch.float64)
        est.append((P(x[None]) @ P(y[None]).T).item())
    est = np.array(est)
    assert abs(est.mean() - float(x @ y)) < 5 * sd
    assert est.std() > 0.1 * abs(float(x @ y)) / math.sqrt(k)  # the draws do vary
    # every coordinate is kept about k / p of the time (binomial, 5 sd)
    counts = np.zeros(p)
    for seed in range(S):
        counts[RandomMaskProjector(p, k, random_state=seed).index.numpy()] += 1
    assert abs(counts.mean() - S * k / p) < 1e-9
    assert np.abs(counts - S * k / p).max() < 5 * math.sqrt(S * k / p * (1 - k / p)) + 1


def test_selective_mask_keeps_the_top_coordinates():
    p, k = 60, 7
    rng = np.random.RandomState(1)
    scales = rng.permutation(np.arange(1, p + 1, dtype=np.float64))
    signs = rng.choice([-1.0, 1.0], size=(50, p))
    G = torch.from_numpy(signs * scales)  # mean square of coordinate j: scales[j]^2
    P = make_projector(p, k, proj_type="selective_mask", dtype=torch.float64)
    assert isinstance(P, SelectiveMaskProjector) and P.requires_fit
    with pytest.raises(NotFittedError, match="partial_fit"):
        P(G)
    for block in torch.split(G, [7, 20, 23]):  # block by block, as an attributor feeds it
        P.partial_fit(block)
    assert P.n_samples_seen_ == 50
    P.finalize()
    top = np.sort(np.argsort(-scales)[:k])
    assert P.index_.tolist() == top.tolist()
    torch.testing.assert_close(P.scores_, torch.from_numpy(scales**2), rtol=4 * EPS, atol=0)
    assert torch.equal(P(G), G[:, top])  # kept as they are, unscaled
    # fit in one block is the same; zero-variance ties go to the lower index
    Q = SelectiveMaskProjector(p, k, dtype=torch.float64).fit(G)
    assert torch.equal(Q.index_, P.index_)
    Z = torch.zeros(3, 10, dtype=torch.float64)
    Z[:, 8] = 1.0
    assert SelectiveMaskProjector(10, 3, dtype=torch.float64).fit(Z).index_.tolist() == [0, 1, 8]
    with pytest.raises(ValueError, match="partial_fit first"):
        SelectiveMaskProjector(10, 3).finalize()


def test_selective_mask_pickles_and_moves_its_selection():
    G = _randn(20, 30)
    P = SelectiveMaskProjector(30, 5, dtype=torch.float64).fit(G)
    Y = P(G)
    Q = pickle.loads(pickle.dumps(P))
    assert torch.equal(Q.index_, P.index_) and torch.equal(Q(G), Y)
    assert P.to("cpu") is P and torch.equal(P(G), Y)
    P.to(dtype=torch.float32)
    assert torch.equal(P(G), Y.float())


@pytest.mark.parametrize("selective", [False, True])
def test_grass_equals_mask_then_sjlt_by_hand(selective):
    p, mask_dim, k, s = 300, 80, 24, 2
    G = _randn(11, p)
    G[:, ::7] *= 5.0  # give the selective mask something to find
    kind = "selective_grass" if selective else "grass"
    P = make_projector(p, k, proj_type=kind, mask_dim=mask_dim, n_nonzero=s, random_state=3,
                       dtype=torch.float64)
    assert isinstance(P, ComposedProjector) and P.requires_fit == selective
    assert (P.n_features, P.out_dim, P.n_nonzero) == (p, k, s)
    mask, sjlt = P.projectors_
    if selective:
        P.partial_fit(G[:4]).partial_fit(G[4:]).finalize()
        idx = torch.sort(torch.argsort((G**2).mean(0), descending=True, stable=True)
                         [:mask_dim]).values
        scale = 1.0
    else:
        idx = torch.tensor(_mask_index_ref(mask._key, p, mask_dim))
        scale = math.sqrt(p / mask_dim)
    M = torch.zeros(p, mask_dim, dtype=torch.float64)
    M[idx, torch.arange(mask_dim)] = scale
    S = _sjlt_matrix_ref(sjlt._key, mask_dim, k, s)
    expected = G @ M @ S
    torch.testing.assert_close(P(G), expected, rtol=0, atol=_tol(G, M, S))
    assert torch.equal(P(G[2:5]), P(G)[2:5])  # gather + index_add_: bitwise per row
    Q = pickle.loads(pickle.dumps(P))
    assert torch.equal(Q(G), P(G))


def test_grass_default_mask_dim_and_errors():
    P = make_projector(1000, 16, proj_type="grass", random_state=0)
    assert P.projectors_[0].out_dim == 64  # min(n_features, 4 * proj_dim)
    assert make_projector(40, 16, proj_type="grass").projectors_[0].out_dim == 40
    with pytest.raises(ValueError, match="mask_dim=50 must not exceed n_features=40"):
        make_projector(40, 16, proj_type="grass", mask_dim=50)
    with pytest.raises(ValueError, match="proj_dim must not exceed n_features"):
        make_projector(40, 41, proj_type="random_mask")
    with pytest.raises(ValueError, match="n_nonzero"):
        make_projector(100, 4, proj_type="grass", n_nonzero=5)
    with pytest.raises(ValueError, match="Cannot chain"):
        ComposedProjector(RandomMaskProjector(10, 5), SJLTProjector(6, 2))
    with pytest.raises(ValueError, match="first stage"):
        ComposedProjector(RandomMaskProjector(10, 5), SelectiveMaskProjector(5, 2))


def test_layerwise_masks():
    sizes, k = [30, 5, 65], 8
    G = _randn(6, 100)
    P = make_projector(100, k, proj_type="random_mask", layer_sizes=sizes, random_state=0,
                       dtype=torch.float64)
    assert [sub.out_dim for sub in P.projectors_] == [8, 5, 8] and P.out_dim == 21
    off = [0, 30, 35, 100]
    expected = torch.cat([G[:, off[i] : off[i + 1]][:, sub.index] * sub.scale
                          for i, sub in enumerate(P.projectors_)], dim=1)
    assert torch.equal(P(G), expected)
    S = make_projector(100, k, proj_type="selective_grass", layer_sizes=sizes,
                       dtype=torch.float64)
    assert S.requires_fit
    S.fit(G)
    assert not any(sub.projectors_[0].index_ is None for sub in S.projectors_)
    assert S(G).shape == (6, 3 * k)


@pytest.mark.parametrize("proj_type", ["random_mask", "grass"])
def test_data_free_types_pickle_small_and_reproduce(proj_type):
    G = _randn(4, 5000)
    P = make_projector(5000, 64, proj_type=proj_type, random_state=0, dtype=torch.float64)
    Y = P(G)
    data = pickle.dumps(P)
    assert len(data) < 20_000  # index tensors are regenerated, not pickled
    assert torch.equal(pickle.loads(data)(G), Y)
    assert torch.equal(P.to("cpu")(G), Y)
    assert not P.requires_fit and P.fit(G) is P and torch.equal(P(G), Y)  # fit is a no-op


@pytest.mark.gpu
@pytest.mark.parametrize("proj_type", ["random_mask", "grass", "selective_grass"])
def test_cuda_matches_cpu(proj_type):
    G = _randn(16, 3000)
    cpu = make_projector(3000, 64, proj_type=proj_type, random_state=0, dtype=torch.float64)
    gpu = make_projector(3000, 64, proj_type=proj_type, random_state=0, dtype=torch.float64,
                         device="cuda")
    cpu.fit(G)
    gpu.fit(G.cuda())
    mask_cpu, mask_gpu = (cpu, gpu) if proj_type == "random_mask" else (
        cpu.projectors_[0], gpu.projectors_[0])
    assert torch.equal(mask_gpu.index.cpu(), mask_cpu.index)  # integer hashing: bitwise
    out = gpu(G)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), cpu(G), rtol=0, atol=64 * EPS * G.abs().max().item())
    torch.testing.assert_close(gpu.to("cpu")(G), cpu(G), rtol=0,
                               atol=64 * EPS * G.abs().max().item())
