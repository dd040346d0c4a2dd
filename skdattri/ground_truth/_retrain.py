"""The retraining kernel: fit clones of a model on subsets of its training rows.

Everything that retrains goes through here: the ground truths of this package
and :func:`skdattri.metrics.brittleness`. The functions without a leading
underscore are the kernel's interface to the rest of skdattri:

- :data:`RETRAIN_CONSTRAINTS` -- the shared ``validate_params`` entries (data,
  ``n_jobs``, ``random_state``, ``memory``, ``verbose``);
- :func:`check_retrain_data` -- row counts of the training and query data;
- :func:`model_to_retrain` -- the unfitted clone that is shipped to the workers;
- :func:`one_thread_per_fit` -- whether parallel fits must share the CPU;
- :func:`fit_clone_and_apply` -- one seeded retrain without some rows;
- :func:`cached_runner` -- a job function cached on disk by ``memory=``;
- :func:`run_retrains` -- the query targets of many retrains, through joblib.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from numbers import Integral

import joblib
import numpy as np
import torch
from sklearn.base import clone
from sklearn.utils._param_validation import HasMethods
from sklearn.utils.validation import check_memory

from .._utils import _n_rows, _take_rows, _thread_limit
from ._targets import query_targets

__all__ = [
    "RETRAIN_CONSTRAINTS",
    "cached_runner",
    "check_retrain_data",
    "fit_clone_and_apply",
    "model_to_retrain",
    "one_thread_per_fit",
    "run_retrains",
]

#: ``validate_params`` constraints of the arguments every retraining function takes.
RETRAIN_CONSTRAINTS = {
    "X_train": "no_validation",
    "y_train": "no_validation",
    "X_test": "no_validation",
    "y_test": "no_validation",
    "n_jobs": [Integral, None],
    "random_state": ["random_state"],
    "memory": [str, os.PathLike, None, HasMethods(["cache"])],
    "verbose": ["verbose"],
}


def check_retrain_data(X_train, y_train, X_test, y_test):
    """Check that the training and query data have labels of matching lengths.

    Returns
    -------
    n_train, n_test : int
        Row counts; at least 2 training rows are required.
    """
    n_train, n_test = _n_rows(X_train), _n_rows(X_test)
    if y_train is None or y_test is None:
        raise ValueError("y_train and y_test are required to measure the query targets.")
    if _n_rows(y_train) != n_train:
        raise ValueError(f"X_train has {n_train} rows but y_train has {_n_rows(y_train)}.")
    if _n_rows(y_test) != n_test:
        raise ValueError(f"X_test has {n_test} rows but y_test has {_n_rows(y_test)}.")
    if n_train < 2:
        raise ValueError(f"Need at least 2 training samples, got {n_train}.")
    return n_train, n_test


def model_to_retrain(estimator):
    """The unfitted ``clone`` of ``estimator`` to retrain (and to ship and hash).

    A top-level ``FrozenEstimator`` is unwrapped first (it would not retrain);
    frozen steps inside a ``Pipeline`` stay frozen.
    """
    from sklearn.frozen import FrozenEstimator

    while isinstance(estimator, FrozenEstimator):
        estimator = estimator.estimator
    return clone(estimator)


def _skorch_prefixes(estimator):
    """Parameter prefixes of every skorch net inside ``estimator`` ("" for itself)."""
    skorch = sys.modules.get("skorch")  # a skorch net means skorch was imported
    if skorch is None:
        return []
    if isinstance(estimator, skorch.NeuralNet):
        return [""]
    if not hasattr(estimator, "get_params"):
        return []
    return [
        key + "__"
        for key, value in estimator.get_params(deep=True).items()
        if isinstance(value, skorch.NeuralNet)
    ]


def _uses_torch(estimator):
    return bool(_skorch_prefixes(estimator))


def one_thread_per_fit(estimator, n_jobs):
    """Whether each fit should use one torch thread: torch is involved and fits run in
    parallel (one process per core already uses the cores)."""
    return _uses_torch(estimator) and joblib.effective_n_jobs(n_jobs) != 1


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
    np_state = np.random.get_state()
    # fork the CUDA generators too once CUDA is in use (without initialising it)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), _thread_limit(1 if limit_threads else None):
        torch.manual_seed(int(seed))
        np.random.seed(int(seed) % (2**32))
        try:
            yield
        finally:
            np.random.set_state(np_state)


def fit_clone_and_apply(estimator, X_train, y_train, removed, seed, apply, *, limit_threads=False):
    """Fit ``clone(estimator)`` without the training rows ``removed``; return ``apply(model)``.

    Parameters
    ----------
    estimator : estimator object
        Unfitted model (see :func:`model_to_retrain`); it is cloned, not modified.

    X_train, y_train : array-like, torch tensor, dict of arrays or Dataset
        The full training data.

    removed : ndarray of int
        Sorted, distinct training rows to leave out.

    seed : int
        Sets every ``random_state`` of the clone (nested ones included); a skorch
        net is seeded through torch and numpy's global generators instead, whose
        states are restored afterwards.

    apply : callable
        ``apply(fitted_model)`` gives the result, e.g. the query targets.

    limit_threads : bool, default=False
        Run a torch model's fit and ``apply`` on one torch thread.

    Returns
    -------
    result : object
        What ``apply`` returns. For torch models ``apply`` runs inside the same
        seeded context as the fit (iterating a DataLoader draws from torch's
        global generator, also to predict).
    """
    keep = np.setdiff1d(np.arange(_n_rows(X_train)), removed, assume_unique=True)
    model = _seed_estimator(clone(estimator), seed)
    X_sub, y_sub = _take_rows(X_train, keep), _take_rows(y_train, keep)
    context = (
        _torch_context(seed, limit_threads) if _uses_torch(model) else contextlib.nullcontext()
    )
    with context:
        model.fit(X_sub, y_sub)
        return apply(model)


def cached_runner(func, memory, *, ignore=()):
    """``func`` cached on disk by ``memory``, and whether it is cached.

    Parameters
    ----------
    func : callable
        A module-level job function.

    memory : str, path-like, joblib.Memory or None
        As accepted by :func:`sklearn.utils.validation.check_memory`; ``None``
        (or a ``joblib.Memory`` without location) gives ``func`` itself.

    ignore : sequence of str, default=()
        Arguments of ``func`` left out of the cache key.

    Returns
    -------
    runner : callable
    cached : bool
    """
    memory = check_memory(os.fspath(memory) if isinstance(memory, os.PathLike) else memory)
    if getattr(memory, "location", None) is None and type(memory) is joblib.Memory:
        return func, False
    return memory.cache(func, ignore=list(ignore)), True


def _retrain_targets(
    estimator, X_train, y_train, X_test, y_test, removed, seed, target, data_key, limit_threads
):
    """Fit a clone without the training rows ``removed``; return the query targets.

    ``data_key`` identifies the data for the on-disk cache (the data arguments
    themselves are not hashed per call).
    """
    return fit_clone_and_apply(
        estimator,
        X_train,
        y_train,
        removed,
        seed,
        lambda model: query_targets(model, X_test, y_test, target),
        limit_threads=limit_threads,
    )


def run_retrains(estimator, data, removed, seeds, target, *, n_jobs, memory, verbose,
                 random_state):
    """The query targets of a retrain per (removed rows, seed), through :class:`joblib.Parallel`.

    Parameters
    ----------
    estimator : estimator object
        Model to retrain (a fitted or frozen one only provides its parameters).

    data : tuple
        ``(X_train, y_train, X_test, y_test)``.

    removed : list of ndarray of int
        Sorted training rows to leave out, one entry per group of retrains.

    seeds : sequence of int
        Training seeds: every entry of ``removed`` is retrained with each.

    target : {"loss", "margin"}
        See :func:`~skdattri.ground_truth._targets.query_targets`.

    n_jobs, memory, verbose, random_state
        As in :func:`~skdattri.ground_truth.lds_ground_truth`; ``random_state``
        is only checked (with ``memory=`` an integer is needed to resume).

    Returns
    -------
    values : ndarray of shape (len(removed), len(seeds), n_test), dtype=float64
    """
    X_train, y_train, X_test, y_test = data
    # Ship (and hash for the cache) the unfitted model only.
    estimator = model_to_retrain(estimator)
    runner, cached = cached_runner(
        _retrain_targets, memory, ignore=["X_train", "y_train", "X_test", "y_test", "limit_threads"]
    )
    if cached and not isinstance(random_state, Integral):
        warnings.warn(
            "memory= caches retrains by their random seed; with random_state=None (or a "
            "RandomState instance) the seeds change on every call, so a rerun cannot "
            "reuse the cache. Pass an integer random_state to resume interrupted runs.",
            UserWarning,
        )
    data_key = joblib.hash((X_train, y_train, X_test, y_test)) if cached else None
    limit_threads = one_thread_per_fit(estimator, n_jobs)
    results = joblib.Parallel(n_jobs=n_jobs, verbose=verbose)(
        joblib.delayed(runner)(
            estimator, X_train, y_train, X_test, y_test, rows, seed, target, data_key,
            limit_threads,
        )
        for rows in removed
        for seed in seeds
    )
    return np.asarray(results, dtype=np.float64).reshape(len(removed), len(seeds), -1)
