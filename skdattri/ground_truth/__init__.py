"""Ground truth for attribution metrics, measured by retraining the model.

Attribution scores can only be judged against what actually happens when the
training set changes.  This module retrains ``sklearn.clone(estimator)`` on
subsets of the training data and records the *target* (per-sample loss or
margin) of every query sample under every retrained model:

- :func:`lds_ground_truth` retrains on random subsets (linear datamodeling
  score, LDS), giving an :class:`LDSGroundTruth`;
- :func:`loo_ground_truth` retrains without one training sample at a time
  (leave-one-out, LOO), giving an :class:`LOOGroundTruth`.

Retraining runs through :mod:`joblib` (``n_jobs`` and any joblib backend, so
``with joblib.parallel_config(backend="dask")`` spreads the fits over a Dask
cluster), every fit can be cached on disk with ``memory=`` so an interrupted
run resumes without redoing finished fits, and both result types save to and
load from a single ``.npz`` file.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from numbers import Integral, Real

import joblib
import numpy as np
from sklearn.base import clone, is_classifier, is_regressor
from sklearn.utils import _safe_indexing, check_random_state
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions, validate_params
from sklearn.utils.validation import check_memory

__all__ = [
    "LDSGroundTruth",
    "LOOGroundTruth",
    "lds_ground_truth",
    "load_ground_truth",
    "loo_ground_truth",
]

_TARGETS = ("loss", "margin")
_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------
# result containers
# --------------------------------------------------------------------------------------
def _check_target(target):
    if target not in _TARGETS:
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


class LDSGroundTruth:
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

    Attributes
    ----------
    masks : ndarray of shape (n_subsets, n_train), dtype=bool
    values : ndarray of shape (n_subsets, n_test), dtype=float64
    target : str
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

    def __init__(self, masks, values, target="loss"):
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

    @property
    def n_subsets(self):
        """Number of retrained subsets."""
        return self.masks.shape[0]

    @property
    def n_train(self):
        """Number of training samples."""
        return self.masks.shape[1]

    @property
    def n_test(self):
        """Number of query samples."""
        return self.values.shape[1]

    def __repr__(self):
        return (
            f"LDSGroundTruth(n_subsets={self.n_subsets}, n_train={self.n_train}, "
            f"n_test={self.n_test}, target={self.target!r})"
        )

    def save(self, path):
        """Save to one ``.npz`` file.

        Parameters
        ----------
        path : str or path-like
            Destination file (numpy appends ``.npz`` when missing).
        """
        np.savez(
            path,
            kind=np.array("lds"),
            format_version=np.array(_FORMAT_VERSION),
            masks=self.masks,
            values=self.values,
            target=np.array(self.target),
        )

    @classmethod
    def load(cls, path):
        """Load a ground truth written by :meth:`save`.

        Parameters
        ----------
        path : str or path-like

        Returns
        -------
        ground_truth : LDSGroundTruth
        """
        gt = load_ground_truth(path)
        if not isinstance(gt, cls):
            raise ValueError(f"{path!s} holds a {type(gt).__name__}, not an {cls.__name__}.")
        return gt


class LOOGroundTruth:
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

    Attributes
    ----------
    indices : ndarray of shape (n_removed,), dtype=int64
    values : ndarray of shape (n_removed, n_test), dtype=float64
    target : str
    n_train : int or None
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

    def __init__(self, indices, values, target="loss", *, n_train=None):
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

    @property
    def n_removed(self):
        """Number of left-out training indices."""
        return self.indices.shape[0]

    @property
    def n_test(self):
        """Number of query samples."""
        return self.values.shape[1]

    def __repr__(self):
        return (
            f"LOOGroundTruth(n_removed={self.n_removed}, n_train={self.n_train}, "
            f"n_test={self.n_test}, target={self.target!r})"
        )

    def save(self, path):
        """Save to one ``.npz`` file.

        Parameters
        ----------
        path : str or path-like
            Destination file (numpy appends ``.npz`` when missing).
        """
        np.savez(
            path,
            kind=np.array("loo"),
            format_version=np.array(_FORMAT_VERSION),
            indices=self.indices,
            values=self.values,
            target=np.array(self.target),
            n_train=np.array(-1 if self.n_train is None else self.n_train),
        )

    @classmethod
    def load(cls, path):
        """Load a ground truth written by :meth:`save`.

        Parameters
        ----------
        path : str or path-like

        Returns
        -------
        ground_truth : LOOGroundTruth
        """
        gt = load_ground_truth(path)
        if not isinstance(gt, cls):
            raise ValueError(f"{path!s} holds a {type(gt).__name__}, not a {cls.__name__}.")
        return gt


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
    """
    with np.load(path, allow_pickle=False) as data:
        if "kind" not in data.files:
            raise ValueError(f"{path!s} is not a skdattri ground-truth file (no 'kind').")
        kind = str(data["kind"])
        target = str(data["target"])
        if kind == "lds":
            return LDSGroundTruth(data["masks"], data["values"], target=target)
        if kind == "loo":
            n_train = int(data["n_train"])
            return LOOGroundTruth(
                data["indices"],
                data["values"],
                target=target,
                n_train=None if n_train < 0 else n_train,
            )
    raise ValueError(f"{path!s} holds an unknown ground-truth kind {kind!r}.")


# --------------------------------------------------------------------------------------
# retraining machinery (shared with skdattri.metrics.brittleness)
# --------------------------------------------------------------------------------------
def _num_rows(X):
    """Number of samples of arrays, tensors, dataframes, dicts of arrays or datasets."""
    if isinstance(X, dict):
        if not X:
            raise ValueError("X is an empty dict.")
        return _num_rows(next(iter(X.values())))
    shape = getattr(X, "shape", None)
    if shape is not None and len(shape) > 0:
        return int(shape[0])
    return len(X)


def _take(X, indices):
    """Rows ``indices`` of X (numpy, pandas, sparse, torch tensor or Dataset, list, dict)."""
    if X is None:
        return None
    if isinstance(X, dict):
        return {key: _take(value, indices) for key, value in X.items()}
    torch = _torch_module()
    if torch is not None and isinstance(X, torch.Tensor):
        return X[torch.as_tensor(indices, dtype=torch.long, device=X.device)]
    if torch is not None and isinstance(X, torch.utils.data.Dataset):
        return torch.utils.data.Subset(X, np.asarray(indices).tolist())
    return _safe_indexing(X, indices)


def _unfrozen(estimator):
    """The model to retrain: a top-level ``FrozenEstimator`` is unwrapped (it would not
    retrain); frozen steps inside a ``Pipeline`` stay frozen."""
    try:
        from sklearn.frozen import FrozenEstimator
    except ImportError:  # pragma: no cover - scikit-learn < 1.6
        return estimator
    while isinstance(estimator, FrozenEstimator):
        estimator = estimator.estimator
    return estimator


def _check_memory(memory):
    return check_memory(os.fspath(memory) if isinstance(memory, os.PathLike) else memory)


def _is_torch_tensor(X):
    torch = _torch_module()
    return torch is not None and isinstance(X, torch.Tensor)


def _torch_module():
    import sys

    return sys.modules.get("torch")


def _skorch_net_class():
    import sys

    skorch = sys.modules.get("skorch")
    return None if skorch is None else skorch.NeuralNet


def _skorch_prefixes(estimator):
    """Parameter prefixes of every skorch net inside ``estimator`` ("" for itself)."""
    net_class = _skorch_net_class()
    if net_class is None:
        return []
    if isinstance(estimator, net_class):
        return [""]
    prefixes = []
    if hasattr(estimator, "get_params"):
        for key, value in estimator.get_params(deep=True).items():
            if isinstance(value, net_class):
                prefixes.append(key + "__")
    return prefixes


def _uses_torch(estimator):
    return bool(_skorch_prefixes(estimator))


def _seed_estimator(estimator, seed):
    """Set every ``random_state`` of ``estimator`` (and nested ones) from ``seed``.

    Parameters belonging to a skorch net are left untouched (the net is seeded
    through torch instead), as sklearn's ``_set_random_states`` does otherwise.
    """
    skip = _skorch_prefixes(estimator)
    if "" in skip:
        return estimator
    rng = np.random.RandomState(seed)
    to_set = {}
    for key in sorted(estimator.get_params(deep=True)):
        if key != "random_state" and not key.endswith("__random_state"):
            continue
        if any(key.startswith(prefix) for prefix in skip):
            continue
        to_set[key] = int(rng.randint(np.iinfo(np.int32).max))
    if to_set:
        estimator.set_params(**to_set)
    return estimator


@contextlib.contextmanager
def _torch_context(seed, limit_threads):
    """Seed torch and numpy's global RNGs for one retrain, restoring them after."""
    torch = _torch_module()
    if torch is None:  # pragma: no cover - only called when a skorch net is present
        import torch
    n_threads = torch.get_num_threads()
    np_state = np.random.get_state()
    # fork the CUDA generators too once CUDA is in use (without initialising it)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        np.random.seed(int(seed) % (2**32))
        if limit_threads:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if limit_threads:
                torch.set_num_threads(n_threads)
            np.random.set_state(np_state)


def _fit_clone_and_apply(estimator, X_train, y_train, keep, seed, limit_threads, apply):
    """Fit ``clone(estimator)`` on rows ``keep`` (seeds set from ``seed``); return ``apply(model)``.

    For torch models both the fit and ``apply`` run inside :func:`_torch_context`
    (iterating a DataLoader draws from torch's global generator, also to predict).
    """
    model = _seed_estimator(clone(estimator), seed)
    X_sub, y_sub = _take(X_train, keep), _take(y_train, keep)
    context = (
        _torch_context(seed, limit_threads) if _uses_torch(model) else contextlib.nullcontext()
    )
    with context:
        model.fit(X_sub, y_sub)
        return apply(model)


def _as_numpy(a):
    if _is_torch_tensor(a):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _label_columns(model, y, n_columns):
    """Column of ``predict_proba`` for every label in ``y`` (-1 when unseen)."""
    y = _as_numpy(y).ravel()
    classes = getattr(model, "classes_", None)
    if classes is not None:
        classes = _as_numpy(classes).ravel()
    if classes is not None and classes.shape[0] == n_columns:
        order = np.argsort(classes, kind="stable")
        sorted_classes = classes[order]
        pos = np.clip(np.searchsorted(sorted_classes, y), 0, n_columns - 1)
        found = sorted_classes[pos] == y
        return np.where(found, order[pos], -1)
    # Without matching classes_ (e.g. a skorch net whose module has more outputs than
    # the labels seen in its training subset), integer labels are the column indices.
    if np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0)
    ):
        cols = y.astype(np.int64)
        if np.all((cols >= 0) & (cols < n_columns)):
            return cols
    raise ValueError(
        "Cannot map the labels y to the columns of predict_proba: the model has no "
        f"classes_ matching its {n_columns} probability columns and y is not made of "
        f"integer column indices in [0, {n_columns})."
    )


def _class_log_odds(proba, cols):
    """Return ``(log p_y, log(1 - p_y))`` per row, the latter as a sum over other classes.

    Probabilities are floored at the smallest normal number of their dtype before
    the logarithm, so a class predicted with probability 0 gives a large finite
    value rather than ``-inf``. ``1 - p_y`` is computed as the sum of the other
    probabilities, which keeps its precision when ``p_y`` is close to 1.
    """
    proba = _as_numpy(proba)
    tiny = np.finfo(proba.dtype if np.issubdtype(proba.dtype, np.floating) else float).tiny
    proba = np.asarray(proba, dtype=np.float64)
    rows = np.arange(proba.shape[0])
    seen = cols >= 0
    p_y = np.zeros(proba.shape[0])
    p_y[seen] = proba[rows[seen], cols[seen]]
    others = proba.copy()
    others[rows[seen], cols[seen]] = 0.0
    rest = others.sum(axis=1)
    log_py = np.log(np.maximum(p_y, tiny))
    log_rest = np.log(np.maximum(rest, tiny))
    return log_py, log_rest


def _query_targets(model, X_test, y_test, target):
    """Per-query target values of a fitted model, shape (n_test,), float64.

    Classifiers: ``margin = log p_y - log(sum_{k != y} p_k)`` and
    ``loss = log(1 + exp(-margin))``, which equals ``-log p_y`` for normalised
    probabilities. Regressors: ``margin`` is the prediction and ``loss`` the
    squared error (summed over outputs).
    """
    classifier = is_classifier(model) or (
        not is_regressor(model) and hasattr(model, "predict_proba")
    )
    if classifier:
        proba = _as_numpy(model.predict_proba(X_test))
        if proba.ndim == 1:  # a single positive-class column
            proba = np.column_stack([1.0 - proba, proba])
        cols = _label_columns(model, y_test, proba.shape[1])
        if np.any(cols < 0):
            warnings.warn(
                f"{int(np.sum(cols < 0))} query label(s) were not seen by a retrained "
                "model (its training subset lacks that class); their probability is "
                "taken as 0.",
                UserWarning,
            )
        log_py, log_rest = _class_log_odds(proba, cols)
        margin = log_py - log_rest
        if target == "margin":
            return margin
        return np.logaddexp(0.0, -margin)

    pred = np.asarray(_as_numpy(model.predict(X_test)), dtype=np.float64)
    if pred.ndim == 2 and pred.shape[1] == 1:
        pred = pred[:, 0]
    if target == "margin":
        if pred.ndim != 1:
            raise ValueError(
                "target='margin' needs a single-output regressor, got predictions of "
                f"shape {pred.shape}; use target='loss'."
            )
        return pred
    y = np.asarray(_as_numpy(y_test), dtype=np.float64).reshape(pred.shape)
    err = (pred - y) ** 2
    return err if err.ndim == 1 else err.sum(axis=1)


def _retrain_targets(
    estimator, X_train, y_train, X_test, y_test, removed, seed, target, data_key, limit_threads
):
    """Fit a clone without the training rows ``removed``; return the query targets.

    ``data_key`` identifies the data for the on-disk cache (the data arguments
    themselves are not hashed per call).
    """
    keep = np.setdiff1d(np.arange(_num_rows(X_train)), removed, assume_unique=True)
    return _fit_clone_and_apply(
        estimator,
        X_train,
        y_train,
        keep,
        seed,
        limit_threads,
        lambda model: _query_targets(model, X_test, y_test, target),
    )


def _make_runner(memory):
    memory = _check_memory(memory)
    if getattr(memory, "location", None) is None and type(memory) is joblib.Memory:
        return _retrain_targets, False
    return (
        memory.cache(
            _retrain_targets,
            ignore=["X_train", "y_train", "X_test", "y_test", "limit_threads"],
        ),
        True,
    )


def _check_data(X_train, y_train, X_test, y_test):
    n_train, n_test = _num_rows(X_train), _num_rows(X_test)
    if y_train is None or y_test is None:
        raise ValueError("y_train and y_test are required to measure the query targets.")
    if _num_rows(y_train) != n_train:
        raise ValueError(
            f"X_train has {n_train} rows but y_train has {_num_rows(y_train)}."
        )
    if _num_rows(y_test) != n_test:
        raise ValueError(f"X_test has {n_test} rows but y_test has {_num_rows(y_test)}.")
    if n_train < 2:
        raise ValueError(f"Need at least 2 training samples, got {n_train}.")
    return n_train, n_test


def _run_retrains(estimator, data, jobs, target, *, n_jobs, memory, verbose, random_state):
    """Run ``jobs`` = list of (removed_indices, seed); return (n_jobs, n_test) targets."""
    X_train, y_train, X_test, y_test = data
    # Ship (and hash for the cache) the unfitted model only.
    estimator = clone(_unfrozen(estimator))
    runner, cached = _make_runner(memory)
    if cached and not isinstance(random_state, Integral):
        warnings.warn(
            "memory= caches retrains by their random seed; with random_state=None (or a "
            "RandomState instance) the seeds change on every call, so a rerun cannot "
            "reuse the cache. Pass an integer random_state to resume interrupted runs.",
            UserWarning,
        )
    data_key = joblib.hash((X_train, y_train, X_test, y_test)) if cached else None
    limit_threads = _uses_torch(estimator) and joblib.effective_n_jobs(n_jobs) != 1
    results = joblib.Parallel(n_jobs=n_jobs, verbose=verbose)(
        joblib.delayed(runner)(
            estimator,
            X_train,
            y_train,
            X_test,
            y_test,
            removed,
            seed,
            target,
            data_key,
            limit_threads,
        )
        for removed, seed in jobs
    )
    return np.asarray(results, dtype=np.float64).reshape(len(jobs), -1)


def _draw_streams(random_state, n_repeats):
    """Split ``random_state`` into a subset stream and the ``n_repeats`` training seeds.

    The two come from separate streams, so the subsets do not depend on
    ``n_repeats`` and the first seeds do not depend on how many there are.
    """
    subset_seed, seed_seed = check_random_state(random_state).randint(
        np.iinfo(np.int32).max, size=2
    )
    seeds = np.random.RandomState(seed_seed).randint(np.iinfo(np.int32).max, size=n_repeats)
    return np.random.RandomState(subset_seed), seeds


_COMMON_CONSTRAINTS = {
    "estimator": [HasMethods(["fit"])],
    "X_train": "no_validation",
    "y_train": "no_validation",
    "X_test": "no_validation",
    "y_test": "no_validation",
    "n_repeats": [Interval(Integral, 1, None, closed="left")],
    "target": [StrOptions(set(_TARGETS))],
    "n_jobs": [Integral, None],
    "random_state": ["random_state"],
    "memory": [str, os.PathLike, None, HasMethods(["cache"])],
    "verbose": ["verbose"],
}


# --------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------
@validate_params(
    {
        **_COMMON_CONSTRAINTS,
        "n_subsets": [Interval(Integral, 2, None, closed="left")],
        "subset_fraction": [Interval(Real, 0, 1, closed="neither")],
    },
    prefer_skip_nested_validation=True,
)
def lds_ground_truth(
    estimator,
    X_train,
    y_train,
    X_test,
    y_test,
    *,
    n_subsets=100,
    subset_fraction=0.5,
    n_repeats=1,
    target="loss",
    n_jobs=None,
    random_state=None,
    memory=None,
    verbose=0,
):
    """Retrain on random training subsets and record every query's target.

    For each of ``n_subsets`` random subsets of ``round(subset_fraction *
    n_train)`` training samples, ``sklearn.clone(estimator)`` is fitted on the
    subset (``n_repeats`` times with different seeds, averaged) and the target of
    every query sample is recorded. This is the ground truth of the linear
    datamodeling score (:func:`skdattri.metrics.lds_score`).

    Parameters
    ----------
    estimator : estimator object
        Model to retrain: a scikit-learn estimator (also a ``Pipeline``) or a
        skorch ``NeuralNetClassifier`` / ``NeuralNetRegressor``. It is cloned for
        every fit and never modified (a fitted one only provides its
        parameters; a ``FrozenEstimator`` is unwrapped).

    X_train : array-like, torch tensor or dict of arrays, n_train rows
        Training inputs.

    y_train : array-like of shape (n_train,)
        Training targets.

    X_test : array-like, torch tensor or dict of arrays, n_test rows
        Query inputs.

    y_test : array-like of shape (n_test,)
        Query labels (classifier) or targets (regressor).

    n_subsets : int, default=100
        Number of random subsets (retrained models).

    subset_fraction : float in (0, 1), default=0.5
        Fraction of the training set in each subset.

    n_repeats : int, default=1
        Fits per subset; their targets are averaged.

    target : {"loss", "margin"}, default="loss"
        The recorded query value. Classifiers: ``"loss"`` is ``-log p_y`` and
        ``"margin"`` is ``log p_y - log(1 - p_y)``, with ``p_y`` the predicted
        probability of the query's label (``predict_proba`` column found through
        ``classes_``). Regressors: ``"loss"`` is the squared error and
        ``"margin"`` the prediction.

    n_jobs : int, default=None
        Parallel fits through :class:`joblib.Parallel` (``-1`` = all cores).
        Any joblib backend works, e.g. inside
        ``joblib.parallel_config(backend="dask")``.

    random_state : int, RandomState instance or None, default=None
        Draws the subsets and the training seeds. Pass an int for reproducible
        results and for ``memory=`` to resume.

    memory : str, path-like or joblib.Memory, default=None
        Cache every fit on disk. An interrupted run, restarted with the same
        arguments and an integer ``random_state``, reuses the finished fits.

    verbose : int, default=0
        Verbosity of :class:`joblib.Parallel`.

    Returns
    -------
    ground_truth : LDSGroundTruth
        ``masks`` of shape (n_subsets, n_train) and ``values`` of shape
        (n_subsets, n_test).

    Notes
    -----
    Seeds: repeat ``r`` of every subset uses the same seed ``seed_r`` (common
    random numbers across subsets, which lowers the noise in the comparison
    between subsets). ``seed_r`` sets every ``random_state`` parameter of the
    cloned estimator (nested ones included, e.g. in a ``Pipeline``), overriding
    the value it was given; a skorch net is seeded with ``torch.manual_seed``
    (and numpy's global seed) inside the fit, and the global RNG states are
    restored afterwards. The net's other settings (``train_split``,
    callbacks, ...) are used as configured. Subsets and seeds drawn from an
    integer ``random_state`` do not depend on ``n_jobs`` or the backend, the
    subsets do not depend on ``n_repeats``, and the first ``m`` subsets are the
    same for every ``n_subsets >= m``.

    When torch is involved and the fits run in parallel, each fit uses one
    torch thread.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skdattri.ground_truth import lds_ground_truth
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(30, 2)); y = (X[:, 0] > 0).astype(int)
    >>> gt = lds_ground_truth(LogisticRegression(), X[:20], y[:20], X[20:], y[20:],
    ...                       n_subsets=4, random_state=0)
    >>> gt
    LDSGroundTruth(n_subsets=4, n_train=20, n_test=10, target='loss')
    >>> gt.masks.sum(axis=1)
    array([10, 10, 10, 10])
    """
    n_train, n_test = _check_data(X_train, y_train, X_test, y_test)
    subset_size = int(round(subset_fraction * n_train))
    if not 1 <= subset_size <= n_train - 1:
        raise ValueError(
            f"subset_fraction={subset_fraction} gives subsets of {subset_size} of "
            f"{n_train} training samples; it must keep between 1 and n_train - 1."
        )
    rng, seeds = _draw_streams(random_state, n_repeats)
    # One row of uniform keys per subset: the first m rows do not depend on n_subsets.
    keys = rng.random_sample((n_subsets, n_train))
    order = np.argsort(keys, axis=1, kind="stable")
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    np.put_along_axis(masks, order[:, :subset_size], True, axis=1)

    removed = [np.sort(order[s, subset_size:]) for s in range(n_subsets)]
    jobs = [(removed[s], seeds[r]) for s in range(n_subsets) for r in range(n_repeats)]
    values = _run_retrains(
        estimator,
        (X_train, y_train, X_test, y_test),
        jobs,
        target,
        n_jobs=n_jobs,
        memory=memory,
        verbose=verbose,
        random_state=random_state,
    )
    values = values.reshape(n_subsets, n_repeats, n_test).mean(axis=1)
    return LDSGroundTruth(masks, values, target=target)


@validate_params(
    {**_COMMON_CONSTRAINTS, "indices": ["array-like", None]},
    prefer_skip_nested_validation=True,
)
def loo_ground_truth(
    estimator,
    X_train,
    y_train,
    X_test,
    y_test,
    *,
    indices=None,
    n_repeats=1,
    target="loss",
    n_jobs=None,
    random_state=None,
    memory=None,
    verbose=0,
):
    """Retrain without one training sample at a time; record the change of each query.

    Fits ``sklearn.clone(estimator)`` on the full training set and once without
    each training index in ``indices``; the result holds, for every removed
    index and query, ``target(model without the index) - target(full model)``.
    This is the ground truth of :func:`skdattri.metrics.loo_score`.

    Parameters
    ----------
    estimator : estimator object
        Model to retrain (scikit-learn estimator, ``Pipeline`` or skorch net).
        It is cloned for every fit and never modified.

    X_train : array-like, torch tensor or dict of arrays, n_train rows
        Training inputs.

    y_train : array-like of shape (n_train,)
        Training targets.

    X_test : array-like, torch tensor or dict of arrays, n_test rows
        Query inputs.

    y_test : array-like of shape (n_test,)
        Query labels or targets.

    indices : array-like of int, default=None
        Training indices to leave out, one model each. ``None`` = all of them.

    n_repeats : int, default=1
        Fits per removed index (and of the full model), with seeds
        ``seed_1..seed_{n_repeats}``; the changes are averaged.

    target : {"loss", "margin"}, default="loss"
        The query value whose change is recorded; see :func:`lds_ground_truth`.

    n_jobs : int, default=None
        Parallel fits through :class:`joblib.Parallel`.

    random_state : int, RandomState instance or None, default=None
        Draws the training seeds.

    memory : str, path-like or joblib.Memory, default=None
        Cache every fit on disk so an interrupted run resumes.

    verbose : int, default=0
        Verbosity of :class:`joblib.Parallel`.

    Returns
    -------
    ground_truth : LOOGroundTruth
        ``values`` of shape (n_removed, n_test).

    Notes
    -----
    Sign: with ``target="loss"`` a helpful training sample has a positive value
    (the query's loss rises without it); with ``target="margin"`` a negative
    one. Repeat ``r`` of the full model and of every leave-one-out model share the
    seed ``seed_r``, so for a deterministic training procedure removing nothing
    changes nothing and every value is exactly the effect of the removal.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.linear_model import LogisticRegression
    >>> from skdattri.ground_truth import loo_ground_truth
    >>> rng = np.random.RandomState(0)
    >>> X = rng.normal(size=(30, 2)); y = (X[:, 0] > 0).astype(int)
    >>> gt = loo_ground_truth(LogisticRegression(), X[:20], y[:20], X[20:], y[20:],
    ...                       indices=[0, 1, 2], random_state=0)
    >>> gt
    LOOGroundTruth(n_removed=3, n_train=20, n_test=10, target='loss')
    >>> gt.values.shape
    (3, 10)
    """
    n_train, n_test = _check_data(X_train, y_train, X_test, y_test)
    if indices is None:
        indices = np.arange(n_train)
    else:
        indices = np.asarray(indices)
        if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
            raise ValueError("indices must be a 1-d array of integer training indices.")
        if indices.size and (indices.min() < -n_train or indices.max() >= n_train):
            raise ValueError(f"indices must lie in [0, {n_train}), got {indices}.")
        indices = np.where(indices < 0, indices + n_train, indices).astype(np.int64)
    _, seeds = _draw_streams(random_state, n_repeats)

    empty = np.zeros(0, dtype=np.int64)
    jobs = [(empty, seed) for seed in seeds]
    jobs += [(np.array([j], dtype=np.int64), seed) for j in indices for seed in seeds]
    values = _run_retrains(
        estimator,
        (X_train, y_train, X_test, y_test),
        jobs,
        target,
        n_jobs=n_jobs,
        memory=memory,
        verbose=verbose,
        random_state=random_state,
    )
    full = values[:n_repeats]  # (n_repeats, n_test)
    loo = values[n_repeats:].reshape(len(indices), n_repeats, n_test)
    changes = (loo - full[np.newaxis]).mean(axis=1)
    return LOOGroundTruth(indices, changes, target=target, n_train=n_train)
