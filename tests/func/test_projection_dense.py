"""The dense projection's fast generation and caching (skdattri.func.projection._dense)."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from skdattri.func import projection as proj
from skdattri.func.projection import DenseProjector, make_projector
from skdattri.func.projection import _base as proj_base
from skdattri.func.projection import _dense as proj_dense


def _lsr(z, shift):
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def _rows_reference(P, start, stop):
    """The previous block path, written out: one counter tensor and one hash per block."""
    k, dtype = P.proj_dim, P.dtype
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    rows = torch.arange(start, stop, dtype=torch.int64)
    scale = 1.0 / math.sqrt(k)
    if P.proj_type == "rademacher":
        # entry (i, j): bit j % 64 of hash(i * ceil(k / 64) + j // 64), one hash per entry
        cols = torch.arange(k)
        z = proj._hash_(rows[:, None] * (-(-k // 64)) + cols // 64, P._key)
        bit = (z >> (cols % 64)) & 1  # arithmetic shift: bit 63 is the sign, still right
        return (1 - 2 * bit).to(dtype).mul_(scale)
    half = (k + 1) // 2
    z = proj._hash_(rows[:, None] * half + torch.arange(half), P._key)
    u1 = _lsr(z, 32).to(cdtype).add_(1.0).mul_(2.0**-32)
    theta = (z & 0xFFFFFFFF).to(cdtype).mul_(2.0 * math.pi * 2.0**-32)
    radius = u1.log_().mul_(-2.0).sqrt_().mul_(scale)
    out = torch.empty(stop - start, k, dtype=cdtype)
    out[:, 0::2] = radius * torch.cos(theta)
    out[:, 1::2] = (radius * torch.sin(theta))[:, : k // 2]
    return out.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("proj_type", ["gaussian", "rademacher"])
@pytest.mark.parametrize("k", [1, 2, 257, 3000])
def test_fast_generation_equals_the_previous_block_path_bitwise(proj_type, dtype, k):
    P = DenseProjector(150, k, proj_type=proj_type, random_state=5, dtype=dtype)
    assert torch.equal(P._build_matrix(), _rows_reference(P, 0, 150))
    assert torch.equal(P._rows(37, 101), _rows_reference(P, 37, 101))


@pytest.mark.parametrize("proj_type", ["gaussian", "rademacher"])
@pytest.mark.parametrize("chunk", [1, 5, 64, 2**20])
def test_generation_is_bitwise_independent_of_the_chunk_size(chunk, proj_type, monkeypatch):
    P = DenseProjector(120, 257, proj_type=proj_type, random_state=9, dtype=torch.float32)
    ref = P._build_matrix()
    monkeypatch.setattr(proj_dense, "_CHUNK", chunk)
    assert torch.equal(P._build_matrix(), ref)


@pytest.mark.parametrize("proj_type", ["gaussian", "rademacher"])
def test_cached_and_blockwise_paths_share_the_matrix(proj_type, monkeypatch):
    p, k = 500, 96
    G = torch.randn(33, p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cached = make_projector(p, k, proj_type=proj_type, random_state=2, dtype=torch.float64)
    monkeypatch.setattr(proj_base, "_WORK_BYTES", 8 * k * 45)  # 45 rows: 12 blocks
    blockwise = make_projector(p, k, proj_type=proj_type, random_state=2, dtype=torch.float64,
                               max_dense_bytes=0)
    assert cached.cached and not blockwise.cached and blockwise._block_rows() == 45
    R = cached.matrix()
    if proj_type == "gaussian":
        assert cached._matrix is R and cached.matrix() is R  # generated once, then kept
    assert torch.equal(blockwise.matrix(), R) and blockwise._matrix is None
    Y = cached(G)
    if proj_type == "rademacher":  # kept packed, one bit per entry, from the first call
        assert cached._matrix.dtype == torch.uint8 and cached._matrix.shape == (p, 16)
    # float64 rounding of a length-p dot product, in another order
    tol = 4 * p * torch.finfo(torch.float64).eps * (G.abs() @ R.abs()).max().item()
    torch.testing.assert_close(blockwise(G), Y, rtol=0, atol=tol)
    # batch-size independence: any rows, any batches
    torch.testing.assert_close(torch.cat([cached(G[i : i + 4]) for i in range(0, 33, 4)]), Y,
                               rtol=0, atol=tol)
    torch.testing.assert_close(blockwise(G[5:6]), Y[5:6], rtol=0, atol=tol)


def test_a_cached_call_is_one_matrix_product():
    P = make_projector(300, 64, random_state=0)
    G = torch.randn(8, 300)
    P(G)  # generates the matrix

    class Ops(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops():
        P(G)
    assert [op for op in Ops.seen if op not in ("_to_copy", "detach", "alias")] == ["mm"]


def test_default_budget_caches_the_mlp_matrix():
    # 101,770 x 4096 float32 = 1.67 GB: within the default 4 GiB, so generated once
    P = make_projector(101_770, 4096, random_state=0)
    assert P.max_dense_bytes == 2**32 and P.cached and P._matrix is None  # lazily
    assert not make_projector(101_770, 4096, random_state=0, dtype=torch.float64,
                              max_dense_bytes=2**31).cached
    P.to(dtype=torch.float64)
    assert P.cached  # 3.3 GB


@pytest.mark.parametrize("k", [1, 63, 64, 65, 130])
def test_rademacher_layout_pinned_against_python_splitmix64(k):
    """Entry (i, j) is (1 - 2 b) / sqrt(k), b = bit j % 64 of hash(i * ceil(k/64) + j // 64):
    64 signs per hash, written out with the pure-Python SplitMix64."""
    p, w = 7, -(-k // 64)
    P = DenseProjector(p, k, proj_type="rademacher", random_state=11, dtype=torch.float64)
    words = [[proj._splitmix64_py(i * w + c, P._key) & (2**64 - 1) for c in range(w)]
             for i in range(p)]
    ref = torch.tensor([[(1 - 2 * ((words[i][j // 64] >> (j % 64)) & 1)) / math.sqrt(k)
                         for j in range(k)] for i in range(p)], dtype=torch.float64)
    assert torch.equal(P.matrix(), ref)
    assert torch.equal(P._rows(3, 7), ref[3:])
    G = torch.eye(p, dtype=torch.float64)
    assert torch.equal(P(G), ref)  # the packed (cached) path: identity rows select entries
    assert P._matrix.dtype == torch.uint8 and P._matrix.shape == (p, 8 * w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("expand_bytes", [1, 8 * 64 * 7, 2**22])
@pytest.mark.parametrize("cached", [True, False])
def test_packed_rademacher_equals_the_dense_product(dtype, expand_bytes, cached, monkeypatch):
    """The packed matrix expanded chunk by chunk gives G @ R of the float matrix, for
    any chunk size (one row, 7 rows, all), cached or regenerated, any rows of G."""
    p, k = 1000, 200
    monkeypatch.setattr(proj_dense, "_EXPAND_BYTES", {"cpu": expand_bytes})
    P = DenseProjector(p, k, proj_type="rademacher", random_state=4, dtype=dtype,
                       max_dense_bytes=2**32 if cached else 0)
    assert P.cached is cached
    G = torch.randn(37, p, dtype=dtype, generator=torch.Generator().manual_seed(1))
    R = P.matrix().to(torch.float64)
    ref = G.to(torch.float64) @ R
    # rounding of a length-p sum of terms bounded by |G| |R|, in dtype
    atol = 4 * p * torch.finfo(dtype).eps * (G.abs().to(torch.float64) @ R.abs()).max().item()
    Y = P(G)
    assert Y.dtype == dtype and Y.shape == (37, k)
    torch.testing.assert_close(Y.to(torch.float64), ref, rtol=0, atol=atol)
    # rows of G are projected independently of the other rows
    for rows in (slice(0, 1), slice(5, 6), slice(3, 30)):
        torch.testing.assert_close(P(G[rows]).to(torch.float64), ref[rows], rtol=0, atol=atol)
    assert (P._matrix is not None) is cached


def test_packed_rademacher_storage_is_one_bit_per_entry():
    # the digits MLP of the benchmarks: 17,226 x 512 would be 35 MB as float32
    P = make_projector(17_226, 512, proj_type="rademacher", random_state=0)
    P(torch.zeros(1, 17_226))
    assert P._matrix.dtype == torch.uint8 and P._matrix.numel() == 17_226 * 512 // 8
    assert P._stored_bytes() == P._matrix.numel()
    # pickling drops it; the reloaded projector regenerates the same matrix
    import pickle

    Q = pickle.loads(pickle.dumps(P))
    assert Q._matrix is None
    G = torch.randn(3, 17_226, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Q(G), P(G))
