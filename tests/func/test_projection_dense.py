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
        z = proj._hash_(rows[:, None] * k + torch.arange(k), P._key)
        return ((z >> 63) | 1).to(dtype).mul_(scale)
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


@pytest.mark.parametrize("chunk", [1, 5, 64, 2**20])
def test_generation_is_bitwise_independent_of_the_chunk_size(chunk, monkeypatch):
    P = DenseProjector(120, 257, random_state=9, dtype=torch.float32)
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
    assert cached._matrix is R and cached.matrix() is R  # generated once, then kept
    assert torch.equal(blockwise.matrix(), R) and blockwise._matrix is None
    Y = cached(G)
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
