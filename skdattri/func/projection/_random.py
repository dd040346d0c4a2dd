"""Counter-based random numbers (SplitMix64) on int64 tensors.

Every random number of the projection kit is a pure function of an integer key
and a position: ``_hash_(counter, key)`` is the SplitMix64 finaliser of
``counter * golden + key``, computed with int64 arithmetic, which wraps modulo
2**64 identically on every torch device. Keys come from the user's seed, a
domain tag (one per kind of random object, so that the objects drawn from one
seed are unrelated) and the shape (:func:`_derive_key`).

:func:`_hash_grid_` is the fast form used to fill large matrices: it hashes a
grid of counters (:func:`_counter_grid`) shifted by a scalar into a preallocated
buffer, so a whole matrix is generated in cache-sized chunks with no temporary
allocation.
"""

# Authors: The skdattri developers
# SPDX-License-Identifier: BSD-3-Clause

import torch

_U64 = (1 << 64) - 1

#: Elements hashed in one step of the chunked generators: with its scratch buffer
#: (2 x 8 bytes per element) a chunk stays in the L2 cache of a CPU core.
_CHUNK = 2**15


def _signed64(u):
    """Reinterpret the low 64 bits of a Python int as a signed int64."""
    u &= _U64
    return u - (1 << 64) if u >= (1 << 63) else u


_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)

# Domain tags so that the different kinds of random objects drawn from one seed
# are unrelated.
_TAGS = {
    "gaussian": 1, "rademacher": 2, "sjlt": 3, "layer": 4, "random_mask": 5,
    "selective_mask": 6, "kron_in": 7, "kron_out": 8, "kron_post": 9,
}


def _splitmix64_py(counter, key):
    """Reference SplitMix64 on Python ints (returns a signed int64)."""
    z = (counter * 0x9E3779B97F4A7C15 + key) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return _signed64(z ^ (z >> 31))


def _derive_key(seed, *salt):
    """Mix an integer seed and salt integers into one signed 64-bit key."""
    key = _splitmix64_py(int(seed) & _U64, 0x5DEECE66D)
    for s in salt:
        key = _splitmix64_py(int(s) & _U64, key & _U64)
    return key


def _sub_seed(seed, *salt):
    """A non-negative seed for a sub-projector, derived from ``seed`` and ``salt``."""
    return _derive_key(seed, *salt) & (_U64 >> 1)


def _lsr(z, shift):
    """Logical right shift of an int64 tensor (torch's ``>>`` is arithmetic)."""
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def _mix_(z, scratch):
    """SplitMix64's finaliser applied to ``z`` in place (``scratch``: same shape)."""
    for shift, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=scratch)
        scratch.bitwise_and_((1 << (64 - shift)) - 1)  # logical shift
        z.bitwise_xor_(scratch)
        if mult is not None:
            z.mul_(mult)
    return z


def _hash_(counter, key):
    """SplitMix64 of ``counter`` (int64 tensor, modified in place) under ``key``.

    int64 multiplication wraps modulo 2**64 on every torch backend, so the
    result is the same bit pattern on CPU and CUDA.
    """
    z = counter.mul_(_GOLDEN).add_(key)
    return _mix_(z, torch.empty_like(z))


def _counter_grid(rows, width, device):
    """``(r * width + c) * golden`` (wrapped) for a ``(rows, width)`` grid of counters."""
    r = torch.arange(rows, dtype=torch.int64, device=device).mul_(_signed64(width * _GOLDEN))
    c = torch.arange(width, dtype=torch.int64, device=device).mul_(_GOLDEN)
    return r[:, None] + c


def _hash_grid_(out, scratch, grid, first, key):
    """SplitMix64 of the counters ``first + grid`` under ``key``, into ``out`` (in place).

    Parameters
    ----------
    out, scratch : int64 Tensor
        Destination and a work buffer, both of ``grid``'s shape.
    grid : int64 Tensor
        Counter offsets times the golden constant (:func:`_counter_grid`).
    first : int
        The counter of ``grid``'s first entry.
    key : int
        Signed 64-bit key.

    Returns
    -------
    out : Tensor
        Equal to ``_hash_(first + counters, key)``: the multiplication wraps modulo
        2**64, so ``counter * golden + key`` is ``grid`` plus one scalar, and the
        counters are never formed.
    """
    torch.add(grid, _signed64(first * _GOLDEN + key), out=out)
    return _mix_(out, scratch)


def _smallest_hashes(key, n, k, device):
    """The ``k`` positions in ``range(n)`` of smallest hash under ``key``, ascending.

    A uniformly random ``k``-subset, drawn without replacement and without a
    random permutation of ``range(n)`` in memory: the hash is a bijection of the
    64-bit counters (no ties), and the positions are scanned in chunks that each
    keep only the running ``k`` smallest. A pure function of ``(key, n, k)``,
    hence the same on every device.
    """
    best_h = torch.empty(0, dtype=torch.int64, device=device)
    best_i = torch.empty(0, dtype=torch.int64, device=device)
    step = max(16 * _CHUNK, k)
    for start in range(0, n, step):
        idx = torch.arange(start, min(start + step, n), dtype=torch.int64, device=device)
        cand_h = torch.cat([best_h, _hash_(idx.clone(), key)])
        cand_i = torch.cat([best_i, idx])
        keep = torch.topk(cand_h, min(k, cand_h.numel()), largest=False, sorted=False).indices
        best_h, best_i = cand_h[keep], cand_i[keep]
    return torch.sort(best_i).values


def _split_bytes_(out, z, scratch):
    """The eight bytes of each int64 of ``z`` (r, w), least significant first, into the
    uint8 ``out`` (r, 8 w): ``out[:, 8 c + b] = (z[:, c] >>> 8 b) & 255``.

    Arithmetic shifts, so the result does not depend on the byte order of the device.
    ``scratch`` is an int64 buffer of ``z``'s shape.
    """
    for b in range(8):
        torch.bitwise_right_shift(z, 8 * b, out=scratch).bitwise_and_(255)
        out[:, b::8].copy_(scratch)
    return out
