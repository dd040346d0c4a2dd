"""What every projector shares: argument checks, devices, pickling, the fit protocol.

A projector is a callable ``P(G) -> (n, P.out_dim)`` with attributes
``n_features``, ``out_dim``, ``proj_type``, ``seed_``, ``device``, ``dtype`` and the
methods

- ``to(device=None, dtype=None)``: move it (same projection), in place;
- ``partial_fit(G)`` / ``finalize()`` / ``fit(G)``: the data-dependent projectors
  (``requires_fit`` is True: the selective mask and compositions that hold one)
  learn from training rows fed block by block, then freeze; for the others these
  are no-ops, so a caller can use the same three calls for every projector.

Tensors regenerated from the seed (``_cache_attrs``) are never pickled; tensors
learned from data (``_state_attrs``) are pickled from the CPU.
"""

# Authors: The skdattri developers
# SPDX-License-Identifier: BSD-3-Clause

import warnings
from numbers import Integral

import numpy as np
import torch

from ..._utils import _seed_from
from ._random import _TAGS, _derive_key

#: Default budget for a cached dense matrix (bytes): 4 GiB holds a 101,770 x 4096
#: float32 matrix (1.67 GB) and a 262,144 x 4096 one.
_DEFAULT_MAX_DENSE_BYTES = 2**32
#: Budget for the temporaries of one generation or application step (bytes).
_WORK_BYTES = 2**27


def _work_bytes():
    """The current working-memory budget (read at call time, so tests can patch it)."""
    return _WORK_BYTES


def _check_positive_int(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (Integral, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    return int(value)


def _check_dtype(dtype):
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}.")
    return dtype


def _compute_dtype(dtype):
    """Precision in which random numbers are generated for ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _itemsize(dtype):
    return dtype.itemsize


def _as_tensor(G):
    return G if isinstance(G, torch.Tensor) else torch.as_tensor(np.asarray(G))


def _fallback_device(owner, device):
    """``device``, or the CPU (with a warning) when it is CUDA and CUDA is missing."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(
            f"{type(owner).__name__} was saved on {device} but CUDA is not available; "
            "loading it on the CPU (the projection is unchanged).",
            UserWarning,
        )
        return torch.device("cpu")
    return device


class _BaseProjector:
    """Common input checks, device handling, pickling and the (no-op) fit protocol."""

    # attributes that are regenerated from the seed, never pickled
    _cache_attrs = ()
    # tensors learned from data: moved by ``to``, pickled from the CPU
    _state_attrs = ()
    #: whether ``partial_fit`` / ``finalize`` must run before projecting
    requires_fit = False

    def __init__(self, n_features, proj_dim, proj_type, random_state, device, dtype):
        self.n_features = _check_positive_int(n_features, "n_features")
        self.proj_dim = _check_positive_int(proj_dim, "proj_dim")
        self.proj_type = proj_type
        self.seed_ = _seed_from(random_state)
        self.device = torch.device(device)
        self.dtype = _check_dtype(dtype)
        self._key = _derive_key(self.seed_, _TAGS[proj_type], self.n_features, self.proj_dim)
        self._clear_cache()

    @property
    def out_dim(self):
        return self.proj_dim

    @property
    def n_nonzero(self):
        return None

    def _check_input(self, G):
        G = _as_tensor(G)
        if G.ndim != 2:
            raise ValueError(
                f"Expected a 2-D tensor of shape (n_samples, {self.n_features}), "
                f"got shape {tuple(G.shape)}."
            )
        if G.shape[1] != self.n_features:
            raise ValueError(
                f"Expected {self.n_features} features, got {G.shape[1]}: the projector "
                "was built for another input dimension."
            )
        return G.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------ fit protocol
    def partial_fit(self, G):
        """Accumulate what a data-dependent projector learns from rows ``G``.

        A no-op for projectors that do not depend on data (``requires_fit`` is
        False). Returns ``self``.
        """
        return self

    def finalize(self):
        """Freeze what :meth:`partial_fit` accumulated. Returns ``self``."""
        return self

    def _discard_stats(self):
        """Forget statistics accumulated by an unfinished :meth:`partial_fit`."""

    def fit(self, *data):
        """:meth:`partial_fit` on ``data`` in one block, then :meth:`finalize`."""
        self._discard_stats()
        self.partial_fit(*data)
        return self.finalize()

    # ------------------------------------------------------------ devices, pickling
    def to(self, device=None, dtype=None):
        """Move the projector (and any cached tensor) to ``device`` / ``dtype``.

        The projection itself does not change: cached tensors are moved, or
        regenerated from the seed when the dtype changes. Returns ``self``
        (modified in place, like :meth:`torch.nn.Module.to`).
        """
        if dtype is not None:
            dtype = _check_dtype(dtype)
            if dtype != self.dtype:
                self.dtype = dtype
                self._clear_cache()
        if device is not None:
            self.device = torch.device(device)
            for name in self._cache_attrs + self._state_attrs:
                value = getattr(self, name)
                if value is not None:
                    setattr(self, name, value.to(self.device))
        return self

    def _clear_cache(self):
        for name in self._cache_attrs:
            setattr(self, name, None)

    def __getstate__(self):
        state = self.__dict__.copy()
        for name in self._cache_attrs:
            state[name] = None  # regenerated from the seed after loading
        for name in self._state_attrs:
            if state.get(name) is not None:
                state[name] = state[name].cpu()
        state["device"] = str(self.device)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.device = _fallback_device(self, state["device"])
        for name in self._state_attrs:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(self.device))

    def __repr__(self):
        extra = f", n_nonzero={self.n_nonzero}" if self.n_nonzero is not None else ""
        return (
            f"{type(self).__name__}(n_features={self.n_features}, out_dim={self.out_dim}, "
            f"proj_type={self.proj_type!r}{extra}, seed={self.seed_}, "
            f"device={str(self.device)!r}, dtype={self.dtype})"
        )


class _ProjectorGroup(_BaseProjector):
    """A projector made of sub-projectors ``projectors_`` (compositions, layers).

    Subclasses set ``projectors_``, ``n_features``, ``proj_type`` and ``seed_``;
    devices, dtypes and the fit protocol are forwarded to the members.
    """

    def _adopt(self, projectors):
        """Take ``projectors`` as members; device and dtype are the first one's."""
        self.projectors_ = list(projectors)
        self.device = self.projectors_[0].device
        self.dtype = self.projectors_[0].dtype
        if any(p.device != self.device or p.dtype != self.dtype for p in self.projectors_):
            raise ValueError("All sub-projectors must share one device and one dtype.")

    @property
    def requires_fit(self):
        return any(p.requires_fit for p in self.projectors_)

    @property
    def n_nonzero(self):
        return self.projectors_[-1].n_nonzero

    def finalize(self):
        for p in self.projectors_:
            p.finalize()
        return self

    def _discard_stats(self):
        for p in self.projectors_:
            p._discard_stats()

    def _clear_cache(self):
        for p in getattr(self, "projectors_", ()):
            p._clear_cache()

    def to(self, device=None, dtype=None):
        for p in self.projectors_:
            p.to(device=device, dtype=dtype)
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = _check_dtype(dtype)
        return self

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.device = self.projectors_[0].device if self.projectors_ else torch.device("cpu")
