"""The two ground-truth containers and their one ``.npz`` file format.

:class:`LDSGroundTruth` and :class:`LOOGroundTruth` share :class:`_GroundTruth`:
each lists its fields once (:attr:`_GroundTruth._fields`), and saving,
loading and the repr are written once from that list. A file holds ``kind``
(which container), ``format_version`` and one entry per field. Files are
written atomically and a damaged one raises a ``ValueError`` naming it
(:mod:`~skdattri.ground_truth._store`).

Format versions: 1 (``masks``/``indices``, ``values``, ``target``, ``n_train``),
2 adds ``provenance`` (a JSON record of how the values were obtained). Version 1
files still load, with ``provenance=None``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ._store import read_npz, write_npz

__all__ = ["LDSGroundTruth", "LOOGroundTruth", "load_ground_truth"]

TARGETS = ("loss", "margin")

#: Version of the ``.npz`` layout written by :meth:`_GroundTruth.save`. Files
#: without the entry (none were written) count as version 1.
FORMAT_VERSION = 2


def _check_target(target):
    if target not in TARGETS:
        raise ValueError(f"target must be 'loss' or 'margin', got {target!r}.")
    return str(target)


def _check_values(values, name, n_rows, n_rows_name):
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-d array of shape ({n_rows_name}, n_test), "
            f"got an array with shape {values.shape}."
        )
    if values.shape[0] != n_rows:
        raise ValueError(
            f"{name} has {values.shape[0]} rows but there are {n_rows} {n_rows_name}; "
            f"{name} must have shape ({n_rows_name}, n_test)."
        )
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contains NaN or infinity.")
    return values


# How a field is written to (encode) and read back from (decode) its npz entry.
_ARRAY = (np.asarray, np.asarray)
_STRING = (np.array, str)
# an int or None, stored as -1 when None
_OPTIONAL_INT = (
    lambda value: np.array(-1 if value is None else value),
    lambda entry: None if int(entry) < 0 else int(entry),
)
# a JSON-able dict or None, stored as a JSON string ("" when None)
_OPTIONAL_JSON = (
    lambda value: np.array("" if value is None else json.dumps(value, sort_keys=True)),
    lambda entry: json.loads(str(entry)) if str(entry) else None,
)


def _check_provenance(provenance):
    if provenance is None:
        return None
    if not isinstance(provenance, dict):
        raise TypeError(f"provenance must be a dict or None, got {type(provenance).__name__}.")
    try:
        json.dumps(provenance)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"provenance must be JSON-serialisable: {exc}") from exc
    return provenance




class _GroundTruth:
    """Save, load and repr of a ground-truth container, from its declared fields.

    A subclass sets ``_kind`` (the ``kind`` entry of its files), ``_fields``
    (``{constructor argument: (encode, decode)}``: every field is an attribute of
    the same name and is saved; a field missing from an older file takes its
    constructor default) and ``_shown`` (the attributes in the repr), and shares
    ``values`` of shape ``(n_rows, n_test)``, ``target`` and ``provenance``.
    """

    _kind = ""
    _fields = {}
    _shown = ()

    @property
    def n_test(self):
        """Number of query samples."""
        return self.values.shape[1]

    def __repr__(self):
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._shown)
        return f"{type(self).__name__}({shown})"

    def save(self, path):
        """Save to one ``.npz`` file.

        Parameters
        ----------
        path : str or path-like
            Destination file (``.npz`` is appended when missing). It is written
            to a temporary file first and then renamed, so an interrupted save
            leaves the previous file (or none), never a truncated one.
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        entries = {name: encode(getattr(self, name)) for name, (encode, _) in self._fields.items()}
        write_npz(path, {"kind": np.array(self._kind),
                         "format_version": np.array(FORMAT_VERSION), **entries})

    @classmethod
    def _from_entries(cls, data):
        return cls(**{name: decode(data[name])
                      for name, (_, decode) in cls._fields.items() if name in data})

    @classmethod
    def load(cls, path):
        """Load a ground truth written by :meth:`save`.

        Parameters
        ----------
        path : str or path-like

        Returns
        -------
        ground_truth : instance of this class
            A ``ValueError`` is raised when the file holds the other kind.
        """
        gt = load_ground_truth(path)
        if not isinstance(gt, cls):
            raise ValueError(f"{path!s} holds a {type(gt).__name__}, not an {cls.__name__}.")
        return gt


class LDSGroundTruth(_GroundTruth):
    """Retrained targets on random training subsets, for the LDS metric.

    Built by :func:`lds_ground_truth`, or directly from your own arrays (for
    example a published ground truth).

    Parameters
    ----------
    masks : array-like of shape (n_subsets, n_train)
        Boolean membership: ``masks[s, j]`` is True when training sample ``j``
        was in the training subset of retrained model ``s``.

    values : array-like of shape (n_subsets, n_test)
        ``values[s, i]`` is the target of query ``i`` under the model retrained
        on subset ``s`` (averaged over repeats when there were several).

    target : {"loss", "margin"}, default="loss"
        What ``values`` measures. For ``"loss"`` lower values mean the subset
        helped the query, for ``"margin"`` higher values do; the metrics in
        :mod:`skdattri.metrics` apply this sign convention.

    provenance : dict, default=None
        How the values were obtained, as recorded by the function that measured
        them (JSON-able): the estimator's repr and fingerprint, the data and
        measure fingerprints, the training ``seeds``, a fingerprint of the rows
        removed for every retrain, the cache ``keys`` and which retrains came
        ``from_cache``. ``None`` for ground truths built from arrays or loaded
        from files of format version 1.

    Attributes
    ----------
    masks : ndarray of shape (n_subsets, n_train), dtype=bool
    values : ndarray of shape (n_subsets, n_test), dtype=float64
    target : str
    provenance : dict or None
    n_subsets, n_train, n_test : int

    See Also
    --------
    lds_ground_truth : Measure it by retraining.
    skdattri.metrics.lds_score : Score attributions against it.

    Examples
    --------
    >>> import numpy as np
    >>> from skdattri.ground_truth import LDSGroundTruth
    >>> masks = np.array([[1, 0, 1], [0, 1, 1]], dtype=bool)
    >>> values = np.array([[0.5, 1.0], [0.7, 0.2]])
    >>> LDSGroundTruth(masks, values, target="loss")
    LDSGroundTruth(n_subsets=2, n_train=3, n_test=2, target='loss')
    """

    _kind = "lds"
    _fields = {"masks": _ARRAY, "values": _ARRAY, "target": _STRING,
               "provenance": _OPTIONAL_JSON}
    _shown = ("n_subsets", "n_train", "n_test", "target")

    def __init__(self, masks, values, target="loss", *, provenance=None):
        masks = np.asarray(masks)
        if masks.ndim != 2:
            raise ValueError(
                "masks must be a 2-d array of shape (n_subsets, n_train), "
                f"got an array with shape {masks.shape}."
            )
        if masks.dtype != bool:
            if not np.all((masks == 0) | (masks == 1)):
                raise ValueError("masks must be boolean (or contain only 0 and 1).")
            masks = masks.astype(bool)
        self.masks = masks
        self.values = _check_values(values, "values", masks.shape[0], "n_subsets")
        self.target = _check_target(target)
        self.provenance = _check_provenance(provenance)

    @property
    def n_subsets(self):
        """Number of retrained subsets."""
        return self.masks.shape[0]

    @property
    def n_train(self):
        """Number of training samples."""
        return self.masks.shape[1]


class LOOGroundTruth(_GroundTruth):
    """Leave-one-out changes of the query targets, for the LOO metric.

    Built by :func:`loo_ground_truth`, or directly from your own arrays.

    Parameters
    ----------
    indices : array-like of shape (n_removed,)
        Training indices that were removed (one retrained model each).

    values : array-like of shape (n_removed, n_test)
        ``values[r, i] = target_i(model without indices[r]) - target_i(full model)``,
        the change of query ``i``'s target when ``indices[r]`` is left out of
        training (averaged over repeats when there were several).

    target : {"loss", "margin"}, default="loss"
        What the target is. A training sample that helps a query has a
        *positive* value for ``"loss"`` (removing it raises the loss) and a
        *negative* value for ``"margin"`` (removing it lowers the margin).

    n_train : int, default=None
        Number of training samples of the full model, used to check that an
        attributor was fitted on the same training set. ``None`` when unknown.

    provenance : dict, default=None
        How the values were obtained (the full model's retrains first, then one
        group per removed index); see :class:`LDSGroundTruth`.

    Attributes
    ----------
    indices : ndarray of shape (n_removed,), dtype=int64
    values : ndarray of shape (n_removed, n_test), dtype=float64
    target : str
    n_train : int or None
    provenance : dict or None
    n_removed, n_test : int

    See Also
    --------
    loo_ground_truth : Measure it by retraining.
    skdattri.metrics.loo_score : Score attributions against it.

    Examples
    --------
    >>> import numpy as np
    >>> from skdattri.ground_truth import LOOGroundTruth
    >>> LOOGroundTruth([0, 2], np.array([[0.1, -0.2], [0.0, 0.3]]), n_train=3)
    LOOGroundTruth(n_removed=2, n_train=3, n_test=2, target='loss')
    """

    _kind = "loo"
    _fields = {"indices": _ARRAY, "values": _ARRAY, "target": _STRING, "n_train": _OPTIONAL_INT,
               "provenance": _OPTIONAL_JSON}
    _shown = ("n_removed", "n_train", "n_test", "target")

    def __init__(self, indices, values, target="loss", *, n_train=None, provenance=None):
        indices = np.asarray(indices)
        if indices.ndim != 1:
            raise ValueError(
                f"indices must be a 1-d array of training indices, got shape {indices.shape}."
            )
        if indices.size and not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"indices must be integers, got dtype {indices.dtype}.")
        indices = indices.astype(np.int64)
        if indices.size and indices.min() < 0:
            raise ValueError("indices must be non-negative training indices.")
        if np.unique(indices).size != indices.size:
            raise ValueError("indices must not contain duplicates.")
        if n_train is not None:
            n_train = int(n_train)
            if indices.size and indices.max() >= n_train:
                raise ValueError(
                    f"indices must be smaller than n_train={n_train}, got {indices.max()}."
                )
        self.indices = indices
        self.values = _check_values(values, "values", indices.shape[0], "n_removed")
        self.target = _check_target(target)
        self.n_train = n_train
        self.provenance = _check_provenance(provenance)

    @property
    def n_removed(self):
        """Number of left-out training indices."""
        return self.indices.shape[0]


_KINDS = {cls._kind: cls for cls in (LDSGroundTruth, LOOGroundTruth)}


def load_ground_truth(path):
    """Load an :class:`LDSGroundTruth` or :class:`LOOGroundTruth` from ``.npz``.

    Parameters
    ----------
    path : str or path-like
        A file written by ``LDSGroundTruth.save`` or ``LOOGroundTruth.save``.

    Returns
    -------
    ground_truth : LDSGroundTruth or LOOGroundTruth
        Whichever type the file holds.

    Raises
    ------
    ValueError
        Naming the file, when it is truncated or damaged, is not a skdattri
        ground truth, holds inconsistent entries or was written by a newer
        skdattri.

    Examples
    --------
    >>> import os, tempfile
    >>> from skdattri.ground_truth import LOOGroundTruth, load_ground_truth
    >>> path = os.path.join(tempfile.mkdtemp(), "loo.npz")
    >>> LOOGroundTruth([0, 2], [[0.1], [0.3]], n_train=3).save(path)
    >>> load_ground_truth(path)
    LOOGroundTruth(n_removed=2, n_train=3, n_test=1, target='loss')
    """
    data = read_npz(path)
    if "kind" not in data:
        raise ValueError(f"{path!s} is not a skdattri ground-truth file (no 'kind').")
    kind = str(data["kind"])
    version = int(data["format_version"]) if "format_version" in data else 1
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path!s} has ground-truth format version {version}; this skdattri reads "
            f"versions up to {FORMAT_VERSION}. Upgrade skdattri to load it."
        )
    if kind not in _KINDS:
        raise ValueError(f"{path!s} holds an unknown ground-truth kind {kind!r}.")
    try:
        return _KINDS[kind]._from_entries(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path!s} holds an invalid {_KINDS[kind].__name__}: {exc}") from exc
