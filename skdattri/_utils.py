"""Small private helpers shared across skdattri, each written once.

- rows: :func:`_n_rows`, :func:`_take_rows`, :func:`_as_numpy`, :func:`_tree_to`
- randomness: :func:`_seed_from`, :func:`_child_seed`, :func:`_torch_generator`
- threads: :func:`_thread_limit` (torch and, optionally, BLAS / OpenMP pools)
- memory budgets: :data:`BLOCK_ELEMENTS`, :func:`_rows_per_block`
- devices and progress: :func:`_resolve_device`, :func:`_progress`
- Gram matrices: :func:`_upper_gram_`, :func:`_symmetric_from_upper`
"""

from __future__ import annotations

import contextlib
import numbers
import os

import numpy as np
import torch

# --------------------------------------------------------------------------- budgets

#: Elements of one temporary block of a kernel (a chunk of per-sample outer products,
#: of gradient rows, ...): 2**24 floats are 64 MiB in float32, 128 MiB in float64.
BLOCK_ELEMENTS = 2**24

#: Bytes a cached dense projection matrix (all ensemble members together) may take.
PROJECTION_BYTES = 2**32


def _rows_per_block(elements_per_row, budget=BLOCK_ELEMENTS):
    """How many rows of ``elements_per_row`` elements fit in ``budget`` (at least one)."""
    return max(1, int(budget) // max(1, int(elements_per_row)))


# --------------------------------------------------------------------------- rows


def _n_rows(X):
    """Number of samples of an array, tensor, dataframe, dict of arrays or Dataset."""
    if isinstance(X, dict):
        if not X:
            raise ValueError("X is an empty dict.")
        return _n_rows(next(iter(X.values())))
    shape = getattr(X, "shape", None)
    if shape is not None and len(shape) > 0:
        return int(shape[0])
    return len(X)


def _take_rows(X, idx):
    """Rows ``idx`` (a slice, an index array or tensor) of X.

    Works on numpy arrays, torch tensors, torch Datasets (a ``Subset``), dicts of
    any of these, and whatever :func:`sklearn.utils._safe_indexing` accepts (pandas,
    sparse matrices, lists). ``None`` stays ``None``.
    """
    if X is None:
        return None
    if isinstance(X, dict):
        return {k: _take_rows(v, idx) for k, v in X.items()}
    if isinstance(X, torch.Tensor):
        if isinstance(idx, slice):
            return X[idx]
        return X[torch.as_tensor(np.asarray(idx), dtype=torch.long, device=X.device)]
    if isinstance(X, torch.utils.data.Dataset):
        rows = range(len(X))[idx] if isinstance(idx, slice) else np.asarray(idx)
        return torch.utils.data.Subset(X, [int(i) for i in rows])
    if isinstance(idx, slice) and isinstance(X, np.ndarray):
        return X[idx]
    from sklearn.utils import _safe_indexing

    if isinstance(idx, slice):
        idx = np.arange(_n_rows(X))[idx]
    return _safe_indexing(X, idx)


def _as_numpy(a):
    """A numpy view of an array-like or a (detached, CPU) tensor."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _tree_to(X, device):
    """A tensor, or a dict of tensors, moved to ``device``."""
    if isinstance(X, dict):
        return {k: v.to(device) for k, v in X.items()}
    return X.to(device)


# --------------------------------------------------------------------------- randomness


def _seed_from(random_state) -> int:
    """An int seed from ``None``, an int, a ``RandomState`` or a ``Generator``.

    ``None`` draws from numpy's global generator (so ``np.random.seed`` makes it
    reproducible, as in scikit-learn); a ``RandomState`` / ``Generator`` is drawn from
    once.
    """
    if isinstance(random_state, (bool, np.bool_)):
        raise ValueError(
            f"random_state must be None, an int or a RandomState, got {random_state!r}."
        )
    if random_state is None:
        return int(np.random.randint(0, 2**31 - 1))
    if isinstance(random_state, numbers.Integral):
        return int(random_state)
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**31 - 1))
    raise ValueError(f"random_state must be None, an int or a RandomState, got {random_state!r}.")


def _child_seed(root, *salt) -> int:
    """A seed derived from ``root`` and ``salt`` integers (independent streams)."""
    state = np.random.SeedSequence([int(root), *map(int, salt)]).generate_state(1)
    return int(state[0] & 0x7FFFFFFF)


def _torch_generator(random_state, device="cpu"):
    """A seeded ``torch.Generator`` (a given generator is returned as it is)."""
    if isinstance(random_state, torch.Generator):
        return random_state
    gen = torch.Generator(device=device)
    gen.manual_seed(_seed_from(random_state))
    return gen


# --------------------------------------------------------------------------- threads


def _n_threads(n_jobs):
    """joblib's convention: negative values count back from the number of CPUs."""
    n_cpu = os.cpu_count() or 1
    return int(n_jobs) if n_jobs > 0 else max(1, n_cpu + 1 + int(n_jobs))


@contextlib.contextmanager
def _thread_limit(n_jobs, *, blas=False):
    """Run a block with ``n_jobs`` torch intra-op threads (``None``: unchanged).

    With ``blas=True`` the BLAS / OpenMP pools of numpy and scikit-learn are limited
    too (``threadpoolctl``): training a scikit-learn model on two busy cores with
    every BLAS thread spinning ran 40x slower than with one.
    """
    if n_jobs is None:
        yield
        return
    n = _n_threads(n_jobs)
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        if blas:
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=n):
                yield
        else:
            yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- devices


def _resolve_device(device) -> torch.device:
    """Turn ``"auto"``, a string or a :class:`torch.device` into a device.

    ``"auto"`` means CUDA when it is available, the CPU otherwise. A device this
    build of torch cannot use raises a ``ValueError`` naming it.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={device!r} is not a device torch knows; use 'cpu', 'cuda', "
            "'cuda:N' or 'auto'."
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} was requested but CUDA is not available; "
            "use device='cpu' or device='auto'."
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"device={str(device)!r} was requested but this build of torch has no MPS "
            "support; use device='cpu' or device='auto'."
        )
    if device.type not in ("cpu", "cuda", "mps", "meta"):
        raise ValueError(
            f"device={str(device)!r} is not supported; use 'cpu', 'cuda', 'cuda:N' or "
            "'auto'."
        )
    return device


def _progress(iterable, *, verbose, desc, total=None):
    """Wrap ``iterable`` in a tqdm progress bar when ``verbose`` is truthy."""
    if not verbose:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


#: Height of the row strips of :func:`_upper_gram_`.
_GRAM_TILE = 512


def _upper_gram_(out, part):
    """``out += part^T part`` on and above the diagonal only: one product per strip of
    :data:`_GRAM_TILE` rows, from its diagonal tile to the last column (about 9/16 of the
    work for 8 strips, in 8 products instead of 36 tile products); what lies below the
    diagonal tiles is left as it is."""
    w = part.shape[1]
    for a in range(0, w, _GRAM_TILE):
        b = min(a + _GRAM_TILE, w)
        out[a:b, a:].addmm_(part[:, a:b].T, part[:, a:])


def _symmetric_from_upper(M):
    """The symmetric matrix whose upper triangle is ``M``'s (a new tensor)."""
    return M.triu().add_(M.triu(1).T)
