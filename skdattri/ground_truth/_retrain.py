"""The retraining kernel: fit clones of a model on subsets of its training rows.

Everything that retrains goes through here: the ground truths of this package
and :func:`skdattri.metrics.brittleness`. The functions without a leading
underscore are the kernel's interface to the rest of skdattri:

- :data:`RETRAIN_CONSTRAINTS` -- the shared ``validate_params`` entries (data,
  ``n_jobs``, ``random_state``, ``memory``, ``verbose``);
- :func:`check_retrain_data` -- row counts of the training and query data;
- :func:`model_to_retrain` -- the unfitted clone that is shipped to the workers;
- :func:`one_thread_per_fit` -- whether parallel fits must share the CPU;
- :func:`fit_clone_and_apply` -- one seeded retrain without some rows, never
  returning the result of an interrupted fit;
- :class:`Measure` -- what is recorded of each retrained model;
- :func:`run_retrains` -- many retrains through joblib, cached by ``memory=`` and
  optionally verified by refitting.

Caching and interruptions: the cache keys are computed in the calling process
(:mod:`~skdattri.ground_truth._fingerprint`), the workers only fit and measure, and the
calling process stores each result as it arrives (:mod:`~skdattri.ground_truth._cache`).
A fit interrupted by Ctrl-C -- also one whose library swallowed the
``KeyboardInterrupt`` -- raises instead of returning
(:func:`~skdattri.ground_truth._interrupt.interruption_guard`); an interrupted or
failed run stops the workers (joblib kills its pool when the result generator
fails), and a worker whose parent was killed exits on its own
(:func:`~skdattri.ground_truth._interrupt.watch_parent`).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from numbers import Integral

import joblib
import numpy as np
import torch
from sklearn.base import clone
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods

from .._utils import _n_rows, _progress, _take_rows, _thread_limit
from ._cache import RetrainCache, entry_key
from ._fingerprint import fingerprint
from ._interrupt import interruption_guard, watch_parent
from ._store import write_model

__all__ = [
    "RETRAIN_CONSTRAINTS",
    "VERIFY_RTOL",
    "Measure",
    "check_retrain_data",
    "fit_clone_and_apply",
    "model_to_retrain",
    "one_thread_per_fit",
    "retrain_keys",
    "run_retrains",
]

#: Part of every cache key: bump it when the meaning of a cached value changes.
CACHE_VERSION = "retrain-v2"

#: ``verify=`` accepts a refit that differs from its cached value by up to this
#: fraction of the largest magnitude of the cached values (at least 1).
VERIFY_RTOL = 1e-4

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

    Raises
    ------
    KeyboardInterrupt
        When Ctrl-C interrupted the fit, also when the estimator caught the
        ``KeyboardInterrupt`` and returned a half-trained model (scikit-learn's
        MLPs and skorch nets do): nothing is returned for an interrupted fit.
    """
    keep = np.setdiff1d(np.arange(_n_rows(X_train)), removed, assume_unique=True)
    model = _seed_estimator(clone(estimator), seed)
    X_sub, y_sub = _take_rows(X_train, keep), _take_rows(y_train, keep)
    context = (
        _torch_context(seed, limit_threads) if _uses_torch(model) else contextlib.nullcontext()
    )
    with interruption_guard(), context:
        model.fit(X_sub, y_sub)
        return apply(model)


class Measure:
    """What is recorded of every retrained model: ``func(model, X, *args)``.

    Parameters
    ----------
    func : callable
        A module-level function (it is shipped to the workers and fingerprinted
        by its code) returning one value per row of ``X``.

    X : array-like, torch tensor, dict of arrays or Dataset
        The query rows.

    *args
        Further arguments of ``func`` (e.g. the query labels and the target).

    Attributes
    ----------
    n_values : int
        Rows of ``X``: the length of every measured vector.
    """

    def __init__(self, func, X, *args):
        self.func, self.X, self.args = func, X, args
        self.n_values = _n_rows(X)

    def __call__(self, model):
        return self.func(model, self.X, *self.args)

    def fingerprint(self):
        """Identifies the measure (function, query rows, arguments) in any process."""
        return fingerprint(self.func, self.X, self.args)




def _retrain_job(estimator, X_train, y_train, removed, seed, measure, limit_threads, parent,
                 index, model_path=None):
    """One retrain in a worker: ``(index, measured vector)``; with ``model_path`` the
    fitted model is saved there first (atomically)."""
    watch_parent(parent)

    def apply(model):
        value = measure(model)
        if model_path is not None:
            write_model(model_path, model)
        return value

    value = fit_clone_and_apply(estimator, X_train, y_train, removed, seed, apply,
                                limit_threads=limit_threads)
    return index, np.asarray(value)


def _module_instances(estimator):
    """Names of the parameters of ``estimator`` holding a torch module instance."""
    params = estimator.get_params(deep=True) if hasattr(estimator, "get_params") else {}
    return sorted(k for k, v in params.items() if isinstance(v, torch.nn.Module))


def _warn_about_memory(cache, estimator, random_state):
    if cache is None:
        return
    if not isinstance(random_state, Integral):
        warnings.warn(
            "memory= caches retrains by their random seed; with random_state=None (or a "
            "RandomState instance) the seeds change on every call, so a rerun cannot "
            "reuse the cache. Pass an integer random_state to resume interrupted runs.",
            UserWarning, stacklevel=4,
        )
    instances = _module_instances(estimator)
    if instances:
        warnings.warn(
            f"The parameter {instances[0]!r} is a torch module instance: every retrain "
            "starts from its current weights, which are part of the cache key. Unless "
            "torch was seeded before it was built, they differ between processes and "
            "memory= cannot resume; pass the module class instead (each retrain then "
            "builds it under its own seed, drawn from random_state).",
            UserWarning, stacklevel=4,
        )


def _n_to_verify(verify, n_cached):
    """How many of ``n_cached`` cached retrains ``verify`` asks to refit."""
    if verify is None or n_cached == 0:
        return 0
    if isinstance(verify, Integral):
        return min(int(verify), n_cached)
    return min(n_cached, math.ceil(float(verify) * n_cached))


def _mismatch(refit, cached):
    """Whether a refit disagrees with its cached value (see :data:`VERIFY_RTOL`)."""
    if refit.shape != cached.shape:
        return True
    if refit.dtype.kind in "fc" and cached.dtype.kind in "fc":
        tol = VERIFY_RTOL * max(1.0, float(np.abs(cached).max(initial=0.0)))
        return bool(np.any(np.abs(refit - cached) > tol))
    return not np.array_equal(refit, cached)


def _run_jobs(estimator, train, jobs, measure, *, n_jobs, verbose, desc):
    """Yield ``(job index, value)`` as the retrains ``jobs`` (removed, seed, model path)
    finish."""
    if not jobs:  # everything cached: no worker to start
        return
    X_train, y_train = train
    limit_threads = one_thread_per_fit(estimator, n_jobs)
    parent = os.getpid()
    tasks = (
        joblib.delayed(_retrain_job)(estimator, X_train, y_train, removed, seed, measure,
                                     limit_threads, parent, i, path)
        for i, (removed, seed, path) in enumerate(jobs)
    )
    # One retrain per task (none is lost in an unfinished batch); unordered results, each
    # stored as soon as it arrives. A failing or interrupted generator makes joblib kill
    # its workers.
    parallel = joblib.Parallel(n_jobs=n_jobs, return_as="generator_unordered", batch_size=1)
    with contextlib.closing(parallel(tasks)) as outputs:
        yield from _progress(outputs, verbose=verbose, desc=desc, total=len(jobs))


def retrain_keys(estimator, train, removed, seeds, measure):
    """Cache keys of the retrains, computed in the calling process.

    Parameters are those of :func:`run_retrains` (``estimator`` already the unfitted
    :func:`model_to_retrain`). Returns ``(parts, removed_fingerprints, keys)``: the
    estimator, data and measure fingerprints (a dict), one fingerprint per entry of
    ``removed``, and ``keys[g][r]`` of entry ``g`` with seed ``r``.
    """
    parts = {"estimator_fingerprint": fingerprint(estimator),
             "data_fingerprint": fingerprint(*train),
             "measure_fingerprint": measure.fingerprint()}
    removed_fp = [entry_key(rows) for rows in removed]
    keys = [[entry_key(CACHE_VERSION, *parts.values(), rows, int(seed)) for seed in seeds]
            for rows in removed]
    return parts, removed_fp, keys


def run_retrains(estimator, train, removed, seeds, measure, *, n_jobs, memory, verbose,
                 random_state, verify=None, desc="retrains", model_paths=None):
    """``measure`` of a retrain per (removed rows, seed), through :class:`joblib.Parallel`.

    Parameters
    ----------
    estimator : estimator object
        Model to retrain (a fitted or frozen one only provides its parameters).

    train : tuple
        ``(X_train, y_train)``.

    removed : list of ndarray of int
        Sorted training rows to leave out, one entry per group of retrains.

    seeds : sequence of int
        Training seeds: every entry of ``removed`` is retrained with each.

    measure : Measure
        What is recorded of each retrained model.

    n_jobs, memory, verbose, random_state
        As in :func:`~skdattri.ground_truth.lds_ground_truth`; ``verbose`` shows a
        progress bar of the retrains that run, ``random_state`` draws the entries
        that ``verify`` refits (with ``memory=`` an integer is needed to resume).

    verify : int, float or None, default=None
        Refit this many (int) or this fraction (float) of the retrains found in
        the cache and raise a ``ValueError`` when one differs (entries that do are
        removed from the cache first).

    desc : str, default="retrains"
        Label of the progress bar.

    model_paths : list of list of path, default=None
        ``model_paths[g][r]``: where the worker saves the model fitted for entry ``g``
        with seed ``r`` (:func:`~skdattri.ground_truth._store.write_model`). A cached
        value whose model file is missing is fitted again.

    Returns
    -------
    values : ndarray of shape (len(removed), len(seeds), measure.n_values)
    provenance : dict
        How each value was obtained (JSON-able): ``estimator`` (repr),
        ``estimator_fingerprint``, ``data_fingerprint``, ``measure_fingerprint``,
        ``seeds``, ``removed_fingerprints`` (one per group), ``keys`` and
        ``from_cache`` (one per group and seed).
    """
    estimator = model_to_retrain(estimator)  # ship (and fingerprint) the unfitted model
    cache = RetrainCache.from_memory(memory)
    _warn_about_memory(cache, estimator, random_state)
    seeds = [int(s) for s in seeds]
    parts, removed_fp, keys = retrain_keys(estimator, train, removed, seeds, measure)
    paths = model_paths or [[None] * len(seeds) for _ in removed]
    n_values = measure.n_values
    values = [[None] * len(seeds) for _ in removed]
    cached = []
    if cache is not None:
        for g, r in np.ndindex(len(removed), len(seeds)):
            if paths[g][r] is not None and not os.path.exists(paths[g][r]):
                continue  # the model is wanted too: fit it again
            values[g][r] = cache.load(keys[g][r], n_values)
            if values[g][r] is not None:
                cached.append((g, r))
    todo = [(g, r) for g, r in np.ndindex(len(removed), len(seeds)) if values[g][r] is None]
    n_verify = _n_to_verify(verify, len(cached))
    checks = []
    if n_verify:
        picks = check_random_state(random_state).permutation(len(cached))[:n_verify]
        checks = [cached[i] for i in np.sort(picks)]
    jobs = [(removed[g], seeds[r], paths[g][r]) for g, r in todo]
    jobs += [(removed[g], seeds[r], None) for g, r in checks]
    refits = {}
    for i, value in _run_jobs(estimator, train, jobs, measure, n_jobs=n_jobs,
                              verbose=verbose, desc=desc):
        if i >= len(todo):
            refits[checks[i - len(todo)]] = value
            continue
        g, r = todo[i]
        values[g][r] = value
        if cache is not None:
            record = {"estimator_fingerprint": parts["estimator_fingerprint"],
                      "seed": seeds[r], "removed_fingerprint": removed_fp[g],
                      "n_removed": int(len(removed[g]))}
            cache.store(keys[g][r], value, record)
    if refits:
        _check_refits(cache, keys, values, refits)
    hits = set(cached)
    provenance = {"estimator": repr(estimator), **parts, "seeds": seeds,
                  "removed_fingerprints": removed_fp, "keys": keys,
                  "from_cache": [[(g, r) in hits for r in range(len(seeds))]
                                 for g in range(len(removed))]}
    return np.asarray(values).reshape(len(removed), len(seeds), n_values), provenance


def _check_refits(cache, keys, values, refits):
    """Raise when a refit disagrees with its cached value (removing those entries)."""
    bad = [(g, r) for (g, r), refit in sorted(refits.items())
           if _mismatch(np.asarray(refit), np.asarray(values[g][r]))]
    if not bad:
        return
    for g, r in bad:
        cache.discard(keys[g][r])
    g, r = bad[0]
    refit, old = np.asarray(refits[g, r]), np.asarray(values[g][r])
    detail = "different values"
    if refit.shape == old.shape and refit.dtype.kind in "fc" and old.dtype.kind in "fc":
        detail = f"largest difference {np.abs(refit - old).max():.3g}"
    raise ValueError(
        f"verify: {len(bad)} of {len(refits)} refitted cached retrains differ from their "
        f"cached values (first: retrain {g}, seed {r}, {detail}); they were removed from "
        f"the cache in {cache.directory}. Rerun to recompute them, or clear the cache if "
        "another version of the code wrote it."
    )
