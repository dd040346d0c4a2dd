"""Small private helpers shared across skdattri: devices, seeds, progress bars, threads."""

from __future__ import annotations

import contextlib
import numbers

import numpy as np
import torch


def _resolve_device(device) -> torch.device:
    """Turn ``"auto"``, a string or a :class:`torch.device` into a device.

    ``"auto"`` means CUDA when it is available, the CPU otherwise.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} was requested but CUDA is not available; "
            "use device='cpu' or device='auto'."
        )
    return device


def _seed_from(random_state) -> int:
    """Return an int seed from ``None``, an int or a ``RandomState`` (sklearn style)."""
    if random_state is None:
        return int(np.random.randint(0, 2**31 - 1))
    if isinstance(random_state, numbers.Integral):
        return int(random_state)
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**31 - 1))
    raise ValueError(f"random_state must be None, an int or a RandomState, got {random_state!r}.")


@contextlib.contextmanager
def _torch_threads(n_jobs):
    """Run a block with ``n_jobs`` torch intra-op threads (``None`` leaves torch as is).

    Negative values count back from the number of CPUs as in joblib (-1 = all).
    """
    if n_jobs is None:
        yield
        return
    import os

    n_cpu = os.cpu_count() or 1
    n = n_jobs if n_jobs > 0 else max(1, n_cpu + 1 + n_jobs)
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _progress(iterable, *, verbose, desc, total=None):
    """Wrap ``iterable`` in a tqdm progress bar when ``verbose`` is truthy."""
    if not verbose:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def _to_device(obj, device):
    """Move tensors nested in dicts / lists / tuples (and objects with ``.to``) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return type(obj)((k, _to_device(v, device)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_device(v, device) for v in obj)
    if hasattr(obj, "_skdattri_to"):
        return obj._skdattri_to(device)
    return obj
