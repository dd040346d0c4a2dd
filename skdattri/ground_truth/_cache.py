"""The retrain cache of ``memory=``: one validated ``.npz`` file per finished retrain.

Entries live in ``<memory>/skdattri-retrains/<key>.npz``. The key is computed by the
calling process from what determines the retrain (see
:func:`~skdattri.ground_truth._retrain.run_retrains`), and only that process writes
entries, after a retrain has finished without interruption. Each file holds

- ``value``: the measured vector (query targets, or predictions),
- ``key``: its own key (a file renamed or copied over another is detected),
- ``record``: a JSON line saying how the value was obtained (estimator, data and
  measure fingerprints, seed, removed rows), copied into the provenance of a saved
  ground truth.

Files are written atomically (:func:`~skdattri.ground_truth._store.write_npz`). A
file that cannot be read, or whose value has the wrong shape or is not finite, is
reported in one warning line and recomputed.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import joblib
import numpy as np

from ._store import DamagedFileError, read_npz, write_npz

__all__ = ["RetrainCache", "entry_key"]

#: Folder of the entries inside the ``memory`` directory.
FOLDER = "skdattri-retrains"


class RetrainCache:
    """Finished retrains on disk, keyed by hex strings.

    Parameters
    ----------
    directory : str or path-like
        The ``memory`` folder; entries go to its ``skdattri-retrains`` subfolder,
        which is created here (a ``ValueError`` names a folder that cannot be).

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from skdattri.ground_truth._cache import RetrainCache
    >>> cache = RetrainCache(tempfile.mkdtemp())
    >>> cache.store("abc", np.array([0.5, 1.5]), {"seed": 3})
    True
    >>> cache.load("abc", 2), cache.record("abc"), cache.load("other", 2)
    (array([0.5, 1.5]), {'seed': 3}, None)
    """

    def __init__(self, directory):
        self.directory = Path(directory).expanduser() / FOLDER
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(
                f"memory={os.fspath(directory)!r} cannot hold the retrain cache: "
                f"{self.directory} could not be created ({exc.strerror or exc})."
            ) from exc

    @classmethod
    def from_memory(cls, memory):
        """The cache of a ``memory=`` argument, or None for no caching.

        ``memory`` is None, a folder (str or path-like) or an object with a
        ``location`` folder such as :class:`joblib.Memory` (``location=None``: no
        caching).
        """
        if memory is None:
            return None
        if isinstance(memory, str | os.PathLike):
            return cls(memory)
        if hasattr(memory, "location"):
            return None if memory.location is None else cls(memory.location)
        raise TypeError(
            "memory must be None, a folder or a joblib.Memory, got "
            f"{type(memory).__name__}."
        )

    def path(self, key):
        """The file of entry ``key``."""
        return self.directory / f"{key}.npz"

    def load(self, key, n_values):
        """The cached value of ``key`` (``n_values`` entries), or None when there is none.

        A damaged entry gives one ``UserWarning`` line and None (so it is recomputed
        and then overwritten).
        """
        path = self.path(key)
        try:
            entries = read_npz(path)
        except FileNotFoundError:
            return None
        except DamagedFileError as exc:
            return self._damaged(path, f"damaged or truncated ({exc.reason})")
        value = entries.get("value")
        if value is None or entries.get("key") is None or str(entries["key"]) != key:
            return self._damaged(path, "its entries do not belong to this key")
        if value.shape != (n_values,):
            return self._damaged(path, f"value of shape {value.shape}, expected ({n_values},)")
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            return self._damaged(path, "value contains NaN or infinity")
        return value

    def record(self, key):
        """The ``record`` of an entry (a dict), or None when unreadable."""
        try:
            return json.loads(str(read_npz(self.path(key))["record"]))
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def store(self, key, value, record):
        """Save ``value`` under ``key`` with its ``record`` (a JSON-able dict).

        Values that could not be validated on reading (non-finite floats, object
        arrays) are not stored. Returns whether the entry was written.
        """
        value = np.asarray(value)
        if value.dtype.hasobject or (
            value.dtype.kind in "fc" and not np.all(np.isfinite(value))
        ):
            return False
        write_npz(self.path(key), {"value": value, "key": np.array(key),
                                   "record": np.array(json.dumps(record, sort_keys=True))})
        return True

    def discard(self, key):
        """Remove entry ``key`` (nothing when absent)."""
        self.path(key).unlink(missing_ok=True)

    @staticmethod
    def _damaged(path, reason):
        warnings.warn(f"Cached retrain {path} is {reason}; recomputing it.", UserWarning,
                      stacklevel=3)
        return None


def entry_key(*parts):
    """The key of one retrain from its parts (strings, ints and int arrays)."""
    return joblib.hash(tuple(np.asarray(p, dtype=np.int64) if isinstance(p, np.ndarray) else p
                             for p in parts))
