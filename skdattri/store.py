"""Where train-side caches live: in memory, or in a file on disk, written in row blocks.

An attributor's ``fit`` writes its per-sample gradients (projected features, TRAK
features) into a store one block of rows at a time, calls :meth:`BaseStore.finalize`,
and ``transform`` streams the rows back in blocks (:meth:`BaseStore.inner` for
``Q @ G.T``, :meth:`BaseStore.row_dot` for self-influence, :meth:`BaseStore.gram`
for ``G.T @ G``). Peak memory is then bounded by ``block_rows`` rows, not by
``n_train``, and a memory store and a disk store give identical results: both go
through the same blocks and the same conversions.

A :class:`DiskStore` keeps its rows in a flat file read and written with positional
file I/O, so only the rows asked for enter the process (a memory map would count
every page touched in the resident memory of the process, and measured slower). Its
rows are written by a background thread, one block at a time, while the next block is
computed; reads and :meth:`BaseStore.finalize` wait for them.
``store_dtype`` keeps the rows in half precision (float16 or bfloat16, as TRAK and
kronfluence offer); reads convert them back to ``dtype``.
"""

# Authors: The skdattri developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import copy
import json
import numbers
import os
import re
import socket
import sys
import uuid
import weakref

import numpy as np
import torch

from ._state import _map_state
from ._utils import _resolve_device, _rows_per_block, _symmetric_from_upper, _upper_gram_
from ._writer import _BackgroundWriter, _bytes

__all__ = ["BaseStore", "DiskStore", "MemoryStore", "STORE_DTYPES", "make_store"]

#: The dtypes a store holds, by name (``dtype=`` and ``store_dtype=`` take these names
#: or the torch dtypes themselves).
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                "float32": torch.float32, "float64": torch.float64}

# temporary files: ``.<stem>.<bin|json>.<pid>@<host>.tmp``
_TEMP = re.compile(r"^\.(?P<stem>.+)\.(?:bin|json)\.(?P<pid>\d+)@(?P<host>.+)\.tmp$")
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
_FORMAT = "skdattri.store/1"


def _as_dtype(value, what):
    """A torch floating dtype from a name (``"bfloat16"``) or a torch dtype."""
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        if name in STORE_DTYPES:
            return STORE_DTYPES[name]
    elif not isinstance(value, torch.dtype):
        raise TypeError(f"{what} must be a str or a torch.dtype, got {type(value).__name__}.")
    elif value in STORE_DTYPES.values():
        return value
    raise ValueError(f"{what}={value!r} is not supported; use one of {sorted(STORE_DTYPES)}.")


def _as_count(value, what, minimum=0):
    """``value`` as an int ``>= minimum`` (bools and non-integers are refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}.")
    return int(value)


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _host():
    return socket.gethostname().replace("/", "_")


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _alive(pid):
    """Whether process ``pid`` runs on this machine (signal 0 only checks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _sweep(directory):
    """Remove the temporary files that processes of this machine left when they died."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate a process on Windows
        return
    host = _host()
    with os.scandir(directory) as entries:
        for entry in entries:
            match = _TEMP.match(entry.name)
            if match and match["host"] == host and not _alive(int(match["pid"])):
                _remove(entry.path)


def _write_json(path, temp, content):
    """Write ``content`` to ``path`` atomically (through ``temp`` and ``os.replace``)."""
    with open(temp, "w") as f:
        json.dump(content, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def _check_range(block, stored):
    """A ValueError when finite values of ``block`` became infinite in ``stored``.

    One reduction in the common case; the exact test only when a value is large,
    infinite or NaN (a value a little above the largest still rounds down to it).
    """
    largest = torch.finfo(stored.dtype).max
    if (largest < torch.finfo(block.dtype).max and block.numel()
            and not float(block.abs().amax()) <= largest
            and bool((torch.isinf(stored) & torch.isfinite(block)).any())):
        peak = float(block[torch.isfinite(block)].abs().max())
        raise ValueError(
            f"block has values up to {peak:.3g}, beyond the range of "
            f"{_dtype_name(stored.dtype)} (largest {largest:.3g}); use "
            "store_dtype='bfloat16' or None.")


class BaseStore:
    """A ``(n_rows, n_cols)`` array of train-side rows, written and read in row blocks.

    Use :func:`make_store` to create one; the subclasses :class:`MemoryStore` and
    :class:`DiskStore` say where the rows live.

    Parameters
    ----------
    n_rows, n_cols : int
        Shape of the array (``n_train`` and the width of a cached row).
    dtype : str or torch.dtype
        The dtype rows are read in (the model's dtype).
    storage_dtype : str or torch.dtype, default=None
        The dtype rows are kept in; ``None`` keeps them in ``dtype``.
    device : str or torch.device, default="cpu"
        Where :meth:`read` and the scoring helpers put their results.
    block_rows : int, default=None
        Rows per block of :meth:`blocks` and the helpers; ``None`` fits a block into
        :data:`skdattri._utils.BLOCK_ELEMENTS` elements.

    Attributes
    ----------
    block_rows : int
        Rows per block.
    """

    def __init__(self, n_rows, n_cols, *, dtype, storage_dtype=None, device="cpu",
                 block_rows=None):
        self._shape = (_as_count(n_rows, "n_rows"), _as_count(n_cols, "n_cols"))
        self._dtype = _as_dtype(dtype, "dtype")
        self._storage_dtype = (self._dtype if storage_dtype is None
                               else _as_dtype(storage_dtype, "store_dtype"))
        self._device = _resolve_device(device)
        self.block_rows = (_rows_per_block(n_cols) if block_rows is None
                           else _as_count(block_rows, "block_rows", minimum=1))
        # which rows were written (None once finalized)
        self._written = np.zeros(self._shape[0], dtype=bool)

    # ------------------------------------------------------------------ description
    @property
    def shape(self):
        """``(n_rows, n_cols)``."""
        return self._shape

    @property
    def dtype(self):
        """The dtype of what :meth:`read` returns."""
        return self._dtype

    @property
    def storage_dtype(self):
        """The dtype the rows are kept in."""
        return self._storage_dtype

    @property
    def device(self):
        """Where :meth:`read` and the helpers put their results."""
        return self._device

    @property
    def nbytes(self):
        """Bytes the rows take in storage."""
        return self._shape[0] * self._shape[1] * self._storage_dtype.itemsize

    @property
    def finalized(self):
        """Whether :meth:`finalize` was called (the rows are then read-only)."""
        return self._written is None

    def __len__(self):
        return self._shape[0]

    def __repr__(self):
        return (f"{type(self).__name__}(shape={self.shape}, dtype={_dtype_name(self.dtype)}, "
                f"storage_dtype={_dtype_name(self.storage_dtype)}, device={self.device}"
                f"{self._repr_extra()})")

    def _repr_extra(self):
        return ""

    # ------------------------------------------------------------------ rows
    def _span(self, rows):
        """``(start, stop)`` of a slice of rows with step 1."""
        if not isinstance(rows, slice):
            raise TypeError(f"rows must be a slice, got {type(rows).__name__}.")
        start, stop, step = rows.indices(self._shape[0])
        if step != 1:
            raise ValueError(f"rows must be a slice with step 1, got {rows!r}.")
        return start, max(start, stop)

    def write(self, rows, block):
        """Write ``block`` into ``rows`` (cast to :attr:`storage_dtype`).

        Parameters
        ----------
        rows : slice
            Contiguous rows, e.g. the slice of a training batch.
        block : Tensor or ndarray of shape (len(rows), n_cols)
            Floating values on any device and in any floating dtype.
        """
        if self.finalized:
            raise ValueError(f"{self!r} is finalized and read-only; make a new store to "
                             "write new rows.")
        start, stop = self._span(rows)
        block = torch.as_tensor(block).detach()
        if not block.is_floating_point():
            raise TypeError(f"block must hold floating values, got {block.dtype}.")
        if tuple(block.shape) != (stop - start, self._shape[1]):
            raise ValueError(
                f"block has shape {tuple(block.shape)}, but rows={rows!r} selects "
                f"{stop - start} rows ({start}:{stop}) of a store of shape {self.shape}.")
        stored = block.to(self._storage_dtype)
        _check_range(block, stored)
        self._put(start, stored)
        self._written[start:stop] = True

    def read(self, rows):
        """Rows ``rows`` in :attr:`dtype` on :attr:`device` (only those rows are read).

        A memory store may return a view of its rows: treat the result as read-only.
        """
        start, stop = self._span(rows)
        return self._get(start, stop).to(self._device).to(self._dtype)

    def __getitem__(self, rows):
        """``store[a:b]`` is :meth:`read` of a slice of rows."""
        if not isinstance(rows, slice):
            raise TypeError(f"A store is indexed by a slice of rows, got {type(rows).__name__}.")
        return self.read(rows)

    def buffer(self, rows):
        """A tensor for computing ``rows`` into before :meth:`write`: a view of the rows
        themselves where the store keeps them in :attr:`dtype` on :attr:`device` in
        memory (``write`` of that view then copies nothing), a new tensor otherwise."""
        start, stop = self._span(rows)
        view = self._view(start, stop)
        if view is not None:
            return view
        return torch.empty((stop - start, self._shape[1]), dtype=self._dtype,
                           device=self._device)

    def _view(self, start, stop):
        return None

    def blocks(self, block_rows=None):
        """Yield ``(slice, rows)`` over all rows, ``block_rows`` rows at a time."""
        step = (self.block_rows if block_rows is None
                else _as_count(block_rows, "block_rows", minimum=1))
        n = self._shape[0]
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            yield rows, self.read(rows)

    def finalize(self):
        """End writing: check that every row was written, flush, publish. Returns self."""
        if self.finalized:
            return self
        missing = np.flatnonzero(~self._written)
        if missing.size:
            raise ValueError(f"{missing.size} of the {self._shape[0]} rows of {self!r} were "
                             f"never written (the first is row {missing[0]}); write every "
                             "row before finalize().")
        self._commit()
        self._written = None
        return self

    # ------------------------------------------------------------------ scoring helpers
    def _query(self, Q):
        Q = torch.as_tensor(Q)
        if Q.ndim != 2 or Q.shape[1] != self._shape[1]:
            raise ValueError(f"Q must have shape (n_query, {self._shape[1]}), got "
                             f"{tuple(Q.shape)}.")
        return Q.to(self._device, self._dtype)

    def inner(self, Q, block_rows=None):
        """``Q @ G.T`` for the stored rows ``G``, streamed over row blocks.

        Parameters
        ----------
        Q : Tensor of shape (n_query, n_cols)
            Query rows (moved to :attr:`device` and :attr:`dtype`).
        block_rows : int, default=None
            Rows of ``G`` per block (default :attr:`block_rows`).

        Returns
        -------
        scores : Tensor of shape (n_query, n_rows)
            In :attr:`dtype` on :attr:`device`.
        """
        Q = self._query(Q)
        out = torch.empty((Q.shape[0], self._shape[0]), dtype=self._dtype,
                          device=self._device)
        for rows, G in self.blocks(block_rows):
            out[:, rows] = Q @ G.T
        return out

    def row_dot(self, other=None, block_rows=None):
        """``(other(g) * g).sum(1)`` for every stored row ``g``, block by block.

        Parameters
        ----------
        other : callable, default=None
            ``other(block) -> tensor of the block's shape`` (an inverse-HVP solve, a
            scaling); ``None`` gives the squared norms of the rows.
        block_rows : int, default=None
            Rows per block (default :attr:`block_rows`).

        Returns
        -------
        values : Tensor of shape (n_rows,)
            On :attr:`device`, in the dtype of ``other(block) * block``.
        """
        out = torch.zeros(self._shape[0], dtype=self._dtype, device=self._device)
        for rows, G in self.blocks(block_rows):
            value = (G * (G if other is None else other(G))).sum(1)
            if value.dtype != out.dtype:
                out = out.to(value.dtype)
            out[rows] = value
        return out

    def gram(self, dtype=None, block_rows=None):
        """``G.T @ G``: each row block's product in :attr:`dtype` (at BLAS speed: float32
        for a float32 model), accumulated over the blocks in ``dtype`` (default
        :attr:`dtype`; float64 keeps the sum over many blocks exact to its rounding).

        Returns
        -------
        gram : Tensor of shape (n_cols, n_cols)
            On :attr:`device`.
        """
        dtype = self._dtype if dtype is None else _as_dtype(dtype, "dtype")
        k = self._shape[1]
        out = torch.zeros((k, k), dtype=dtype, device=self._device)
        part = None
        # the tiles on and above the diagonal (about 5/8 of a full product), mirrored
        for _, G in self.blocks(block_rows):
            if G.dtype == dtype:
                _upper_gram_(out, G)
                continue
            part = G.new_zeros((k, k)) if part is None else part.zero_()
            _upper_gram_(part, G)
            out += part
        return _symmetric_from_upper(out)

    # ------------------------------------------------------------------ subclass hooks
    def _get(self, start, stop):  # pragma: no cover - abstract
        """Rows ``start:stop`` in the storage dtype (any device)."""
        raise NotImplementedError

    def _put(self, start, block):  # pragma: no cover - abstract
        """Write ``block`` (storage dtype) from row ``start`` on."""
        raise NotImplementedError

    def _commit(self):  # pragma: no cover - abstract
        raise NotImplementedError


class MemoryStore(BaseStore):
    """Rows kept in one torch tensor on :attr:`device`.

    Parameters are those of :class:`BaseStore`. It pickles and deep-copies its
    tensor, as torch does; the device mover (:func:`skdattri._state._map_state`)
    moves the tensor.

    Examples
    --------
    >>> import torch
    >>> from skdattri.store import MemoryStore
    >>> store = MemoryStore(5, 3, dtype="float32", storage_dtype="bfloat16")
    >>> store.write(slice(0, 5), torch.arange(15.0).reshape(5, 3))
    >>> store.finalize().read(slice(1, 2))
    tensor([[3., 4., 5.]])
    """

    def __init__(self, n_rows, n_cols, *, dtype, storage_dtype=None, device="cpu",
                 block_rows=None):
        super().__init__(n_rows, n_cols, dtype=dtype, storage_dtype=storage_dtype,
                         device=device, block_rows=block_rows)
        self._data = torch.empty(self._shape, dtype=self._storage_dtype, device=self._device)

    def _get(self, start, stop):
        return self._data[start:stop]

    def _put(self, start, block):
        target = self._data[start:start + block.shape[0]]
        if block.data_ptr() != target.data_ptr():  # a buffer() view is written already
            target.copy_(block)

    def _view(self, start, stop):
        if self._storage_dtype == self._dtype:
            return self._data[start:stop]
        return None

    def _commit(self):
        pass

    def _map_device(self, fn, device, memo):
        """A copy whose tensor is ``fn`` of this one's, reading to ``device``."""
        out = copy.copy(self)
        out._data = _map_state(self._data, fn, device, memo)
        out._device = torch.device(device)
        out._written = None if self._written is None else self._written.copy()
        return out


class DiskStore(BaseStore):
    """Rows kept in a flat file under ``directory``, published atomically at finalize.

    The rows are written to a temporary file (``.<name>-<uuid>.bin.<pid>@<host>.tmp``)
    that :meth:`finalize` renames (``os.replace``) to ``<name>-<uuid>.bin``, next to
    a JSON sidecar ``<name>-<uuid>.json`` with the shape and dtypes. An interrupted
    ``fit`` thus never leaves a file that looks complete: the temporary file is
    removed when the store is garbage collected, and the files of processes that died
    are removed by the next store made in the directory. Two stores never share a
    file, so attributors can share a directory.

    Only the rows read or written pass through memory. The store pickles (and
    deep-copies, and moves between devices) as a reference to its file: its path,
    shape and dtypes. A missing or truncated file raises a ``ValueError`` at first use.

    Parameters
    ----------
    directory : str or os.PathLike
        Folder of the file (created if needed).
    n_rows, n_cols, dtype, storage_dtype, device, block_rows
        As in :class:`BaseStore`.
    name : str, default="cache"
        Prefix of the file name (letters, digits, ``_``, ``-``, ``.``).

    Examples
    --------
    >>> import tempfile, torch
    >>> from skdattri.store import DiskStore
    >>> store = DiskStore(tempfile.mkdtemp(), 4, 2, dtype=torch.float64, name="grads")
    >>> store.write(slice(0, 2), torch.ones(2, 2))
    >>> store.write(slice(2, 4), torch.full((2, 2), 2.0))
    >>> store.finalize().inner(torch.tensor([[1.0, 1.0]]))
    tensor([[2., 2., 4., 4.]], dtype=torch.float64)
    >>> store.unlink()
    """

    def __init__(self, directory, n_rows, n_cols, *, dtype, storage_dtype=None,
                 device="cpu", block_rows=None, name="cache"):
        super().__init__(n_rows, n_cols, dtype=dtype, storage_dtype=storage_dtype,
                         device=device, block_rows=block_rows)
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"name must be letters, digits, '_', '-' or '.' (not first), "
                             f"got {name!r}.")
        directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise ValueError(f"store={directory!r} is a file; give a directory for the "
                             "store's files (it is created if needed).")
        os.makedirs(directory, exist_ok=True)
        _sweep(directory)
        self._directory = directory
        self._stem = f"{name}-{uuid.uuid4().hex}"
        self._temp = self._temp_path("bin")
        self._checked = True
        with open(self._temp, "xb") as f:
            f.truncate(self.nbytes)
        self._cleanup = weakref.finalize(self, _remove, self._temp)
        self._writer = None  # a _BackgroundWriter while rows are written

    @property
    def directory(self):
        """The folder of the store's files."""
        return self._directory

    @property
    def path(self):
        """The file of the rows once finalized (``<name>-<uuid>.bin``)."""
        return os.path.join(self._directory, self._stem + ".bin")

    @property
    def sidecar(self):
        """The JSON file describing the rows (``<name>-<uuid>.json``)."""
        return os.path.join(self._directory, self._stem + ".json")

    def _temp_path(self, kind):
        return os.path.join(self._directory, f".{self._stem}.{kind}.{os.getpid()}@{_host()}.tmp")

    def _repr_extra(self):
        return f", path={self.path!r}"

    def _describe(self):
        return {"format": _FORMAT, "shape": list(self._shape),
                "dtype": _dtype_name(self._dtype),
                "storage_dtype": _dtype_name(self._storage_dtype), "byteorder": sys.byteorder}

    def _refit(self):
        return "refit the attributor, or restore the file"

    def _check_sidecar(self):
        try:
            with open(self.sidecar) as f:
                found = json.load(f)
        except FileNotFoundError:  # the rows file alone is enough (size is checked)
            return
        want = self._describe()
        for key in ("format", "shape", "storage_dtype", "byteorder"):
            if found.get(key) != want[key]:
                raise ValueError(f"{self.sidecar} says {key}={found.get(key)!r}, this store "
                                 f"expects {want[key]!r}: {self.path} is not this store's "
                                 f"file; {self._refit()}.")

    def _open(self, mode):
        """The rows file (the temporary one before finalize), its size checked."""
        path = self._temp if not self.finalized else self.path
        try:
            f = open(path, mode, buffering=0)
        except FileNotFoundError:
            raise ValueError(f"The file of {type(self).__name__} {self.path} is missing "
                             f"({path} not found); {self._refit()}.") from None
        size = os.fstat(f.fileno()).st_size
        if size != self.nbytes:
            f.close()
            raise ValueError(
                f"{path} has {size} bytes, but a store of shape {self.shape} in "
                f"{_dtype_name(self._storage_dtype)} takes {self.nbytes}: the file is "
                f"truncated or another file; {self._refit()}.")
        if not self._checked:
            self._check_sidecar()
            self._checked = True
        return f

    def _offset(self, start):
        return start * self._shape[1] * self._storage_dtype.itemsize

    def _seek(self, f, start):
        f.seek(self._offset(start))

    def _settle(self):
        """Wait for the rows being written (raising a write's error) and end the writer."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def _get(self, start, stop):
        self._settle()  # rows are read as written
        out = torch.empty((stop - start, self._shape[1]), dtype=self._storage_dtype)
        view = _bytes(out)
        with self._open("rb") as f:
            self._seek(f, start)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise ValueError(f"{f.name} ended early; {self._refit()}.")
                done += got
        return out

    def _put(self, start, block):
        if self._writer is None:
            self._open("rb").close()  # the temporary file is there, of the right size
            self._writer = _BackgroundWriter(self._temp)
        self._writer.put(self._offset(start), block.cpu().contiguous())

    def _commit(self):
        self._settle()
        with self._open("r+b") as f:
            os.fsync(f.fileno())
        _write_json(self.sidecar, self._temp_path("json"), self._describe())
        os.replace(self._temp, self.path)  # the rows file appears complete, or not at all
        self._cleanup.detach()
        self._cleanup = None

    def unlink(self):
        """Remove the store's files (reading afterwards raises the missing-file error)."""
        try:
            self._settle()
        except OSError:
            pass  # the files are being removed: a failed write of them no longer matters
        if self._cleanup is not None:
            self._cleanup.detach()
            self._cleanup = None
        for path in (self._temp, self.path, self.sidecar):
            _remove(path)

    # ------------------------------------------------------------------ references
    def _reference(self, action):
        """A new store object on the same file (only once the file is complete)."""
        if not self.finalized:
            raise ValueError(f"{self!r} cannot be {action} before finalize(): its rows are "
                             "still being written.")
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        return out

    def __getstate__(self):
        state = self._reference("pickled").__dict__
        state["_checked"] = False  # the file is checked again at first use
        return state

    def __copy__(self):
        return self._reference("copied")

    def __deepcopy__(self, memo):
        return self._reference("copied")  # the same file, never a second one

    def _map_device(self, fn, device, memo):
        """The same file, read to ``device`` (nothing is loaded)."""
        out = self._reference("moved")
        out._device = torch.device(device)
        return out


def make_store(n_rows, n_cols, *, dtype, store=None, store_dtype=None, device="cpu",
               name="cache", block_rows=None):
    """A store for ``n_rows`` cached rows of ``n_cols`` values, in memory or on disk.

    Parameters
    ----------
    n_rows, n_cols : int
        Shape of the cache.
    dtype : str or torch.dtype
        The dtype rows are read in (the model's dtype).
    store : None, "memory", str or os.PathLike, default=None
        ``None`` or ``"memory"``: a tensor on ``device`` (:class:`MemoryStore`); a
        directory: a file in it (:class:`DiskStore`).
    store_dtype : {None, "float16", "bfloat16", "float32", "float64"} or torch.dtype
        The dtype rows are kept in; ``None`` keeps them in ``dtype``.
    device : str or torch.device, default="cpu"
        Where reads and scores go.
    name : str, default="cache"
        Prefix of a disk store's file name.
    block_rows : int, default=None
        Rows per block of streaming reads.

    Returns
    -------
    store : MemoryStore or DiskStore

    Examples
    --------
    >>> import tempfile, torch
    >>> from skdattri.store import make_store
    >>> G = torch.randn(10, 4, dtype=torch.float64)
    >>> stores = [make_store(10, 4, dtype=torch.float64),
    ...           make_store(10, 4, dtype=torch.float64, store=tempfile.mkdtemp())]
    >>> for store in stores:
    ...     for start in range(0, 10, 3):  # as fit writes its batches
    ...         store.write(slice(start, start + 3), G[start:start + 3])
    ...     _ = store.finalize()
    >>> [type(s).__name__ for s in stores]
    ['MemoryStore', 'DiskStore']
    >>> bool(torch.equal(stores[0].inner(G[:2]), stores[1].inner(G[:2])))
    True
    >>> stores[1].unlink()
    """
    kwargs = {"dtype": dtype, "storage_dtype": store_dtype, "device": device,
              "block_rows": block_rows}
    if store is None or (isinstance(store, str) and store == "memory"):
        return MemoryStore(n_rows, n_cols, **kwargs)
    if not isinstance(store, (str, os.PathLike)):
        raise TypeError(f"store must be None, 'memory' or a directory path, got "
                        f"{type(store).__name__}.")
    return DiskStore(store, n_rows, n_cols, name=name, **kwargs)
