"""The benchmark runner: train once, ground truth once, then every method timed and scored."""

from __future__ import annotations

import os
import time
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils import Bunch

from .._utils import _progress, _resolve_device, _thread_limit
from ..datasets import list_settings, load_setting
from ..metrics import lds_score, loo_score, mislabel_auc_score
from ..model import make_model
from ..tracin import TracIn
from ._cache import _resolve_cache_dir, compute_ground_truth
from ._memory import _PeakMemory, _sync
from ._registry import _select_methods, get_method
from ._report import (
    _attributor_params,
    _jsonable,
    _reported_warnings,
    _say,
    format_table,
    published_lds,
)
from ._training import train_with_checkpoints

__all__ = ["run_benchmark"]


def _configure(attributor, *, device, random_state):
    """Give an attributor the run's device, and its seed where it has none."""
    own = attributor.get_params(deep=False)
    updates = {}
    if device is not None and "device" in own:
        updates["device"] = device
    if "random_state" in own and own["random_state"] is None:
        updates["random_state"] = random_state
    if updates:
        attributor.set_params(**updates)
    return attributor


def _auc_of(attributor, setting):
    """Mislabel-detection AUC of a fitted-here attributor on a ``-noisy`` setting."""
    attributor.fit(setting.X_train, setting.y_train)
    if not hasattr(attributor, "self_influence"):
        return None
    return mislabel_auc_score(setting.is_noisy, attributor.self_influence())


def _warm_up(setting, model):
    """Pay torch's one-time set-up costs before timing anything.

    One small untimed per-sample-gradient pass (thread pools, ``torch.func``) and one
    forward-over-reverse product of the model's mean loss: the first ``jvp`` of a
    process loads and scripts torch's forward-AD decompositions (one to two seconds),
    which would otherwise be charged to whichever method happens to use it first.
    """
    n = min(8, len(setting.y_train))
    X, y = setting.X_train[:n], setting.y_train[:n]
    TracIn(model).fit(X, y).transform(setting.X_test[:2], setting.y_test[:2])
    tm = make_model(model, n_train=len(setting.y_train), device="cpu")
    Xt, yt = tm.to_tensor_X(X), tm.to_tensor_y(y)
    params = tm.named_params()

    def mean_loss(p):
        return tm.value(tm.forward(p, Xt), yt, "loss").mean()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.func.jvp(torch.func.grad(mean_loss), (params,), (params,))


def _fit_transform_measured(attributor, setting, *, verbose, name):
    """``fit`` then ``transform`` on a setting, timed apart, under one peak-memory probe.

    Returns ``(scores, fit_seconds, transform_seconds, peak_bytes)``.
    """
    device = _resolve_device(attributor.get_params(deep=False).get("device", "cpu"))
    with _reported_warnings(verbose, name), _PeakMemory(device) as mem:
        t0 = time.perf_counter()
        attributor.fit(setting.X_train, setting.y_train)
        _sync(device)
        t1 = time.perf_counter()
        scores = attributor.transform(setting.X_test, setting.y_test)
        _sync(device)
        t2 = time.perf_counter()
    return np.asarray(scores, dtype=np.float64), t1 - t0, t2 - t1, mem.peak


def _error_record(method, attributor, exc, setting):
    """The record of a method whose attributor raised a ``ValueError`` / ``TypeError``."""
    message = (str(exc).strip().splitlines() or [""])[0]
    return {"method": method.name, "params": _attributor_params(attributor), "lds": None,
            "loo": None, "auc": None, "fit_seconds": None, "transform_seconds": None,
            "peak_memory_mb": None, "setting": setting, "dattri_published_lds": None,
            "error": f"{type(exc).__name__}: {message}"}


def _run_methods(chosen, trained, noisy, lds_gt, loo_gt, *, device, random_state, verbose):
    """One record per method. ``trained`` and ``noisy`` (or None) are
    ``(setting, fitted_model, checkpoints)``."""
    data, model, _ = trained
    _warm_up(data, model)
    records = []
    for method in _progress(chosen, verbose=verbose, desc="methods"):
        attributor = _configure(method.factory(*trained), device=device,
                                random_state=random_state)
        try:
            scores, fit_seconds, transform_seconds, peak = _fit_transform_measured(
                attributor, data, verbose=verbose, name=method.name)
        except (ValueError, TypeError) as exc:
            # the attributor refused this model (its own checks: a memory budget, an
            # unsupported layer ...): a row that says why, and the other methods go on
            records.append(_error_record(method, attributor, exc, data.name))
            _say(verbose, f"{method.name}: {records[-1]['error']}")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant rows are reported as NaN / None
            lds = lds_score(lds_gt, scores)
            loo = None if loo_gt is None else loo_score(loo_gt, scores)
        auc_value = None
        if noisy is not None:
            noisy_attr = _configure(method.factory(*noisy), device=device,
                                    random_state=random_state)
            with _reported_warnings(verbose, method.name + " (noisy)"):
                auc_value = _auc_of(noisy_attr, noisy[0])
        record = {
            "method": method.name,
            "params": _attributor_params(attributor),
            "lds": _jsonable(float(lds)),
            "loo": None if loo is None else _jsonable(float(loo)),
            "auc": None if auc_value is None else _jsonable(float(auc_value)),
            "fit_seconds": fit_seconds,
            "transform_seconds": transform_seconds,
            "peak_memory_mb": peak / 2**20,
            "setting": data.name,
            "dattri_published_lds": published_lds(data.name, method.name),
        }
        records.append(record)
        _say(verbose > 1, format_table([record]))
    return records


def _train(setting, *, n_checkpoints, random_state, verbose, chosen=()):
    record = any(m.records_steps for m in chosen)
    model, checkpoints = train_with_checkpoints(setting, n_checkpoints=n_checkpoints,
                                                random_state=random_state,
                                                record_steps=record, verbose=verbose)
    return setting, model, checkpoints


def _check_int(name, value, low, allowed=()):
    if value in allowed:
        return value
    if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
        shown = " or ".join([f"an integer >= {low}", *map(repr, allowed)])
        raise ValueError(f"{name} must be {shown}, got {value!r}.")
    return int(value)


def _check_cache_dir(cache_dir):
    """``cache_dir`` if it is (or can be created as) a writable folder."""
    path = _resolve_cache_dir(cache_dir)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cache_dir {path} is not a folder ({existing} is a file).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cache_dir {path} is not writable ({existing} is read-only).")
    return path


def _prepare(setting, *, methods, n_subsets, subset_fraction, n_loo, n_train, n_test,
             n_checkpoints, cache_dir, n_jobs, n_threads, random_state, device):
    """Check every option and load the setting, before anything is trained.

    Returns a Bunch with the loaded ``data``, the ``chosen`` methods, ``cache_dir`` and
    ``n_loo``; raises ``ValueError`` naming the first bad option.
    """
    if setting not in list_settings():
        raise ValueError(f"Unknown setting {setting!r}; available: "
                         f"{', '.join(list_settings())}.")
    for name in methods or ():
        get_method(name)  # unknown names, before the setting is loaded
    n_subsets = _check_int("n_subsets", n_subsets, 2)
    if not isinstance(subset_fraction, Real) or not 0 < subset_fraction < 1:
        raise ValueError(f"subset_fraction must lie in (0, 1), got {subset_fraction!r}.")
    n_loo = _check_int("n_loo", n_loo, 2, allowed=("auto", 0))
    n_checkpoints = _check_int("n_checkpoints", n_checkpoints, 1)
    if not isinstance(n_jobs, Integral) or n_jobs == 0:
        raise ValueError(f"n_jobs must be a non-zero integer (-1 = all cores), got {n_jobs!r}.")
    if n_threads is not None:
        _check_int("n_threads", n_threads, 0)
    for name, size in (("n_train", n_train), ("n_test", n_test)):
        if size is not None:
            _check_int(name, size, 1)
    if device is not None:
        _resolve_device(device)
    cache_dir = _check_cache_dir(cache_dir)
    try:
        data = load_setting(setting, random_state=random_state, n_train=n_train,
                            n_test=n_test)
    except (FileNotFoundError, ImportError) as exc:
        raise ValueError(f"Setting {setting!r} cannot be loaded: {exc}") from exc
    chosen = _select_methods(methods, data)
    if not chosen:
        raise ValueError("No method to run.")
    return Bunch(data=data, chosen=chosen, cache_dir=cache_dir, n_subsets=n_subsets,
                 n_loo=n_loo, n_checkpoints=n_checkpoints)


def _execute(plan, *, subset_fraction, auc, n_train, n_test, n_jobs, n_threads, random_state,
             device, verbose):
    """Train, compute the ground truth and run the methods of a :func:`_prepare` plan.

    Everything, training and retraining included, runs with ``n_threads`` torch and
    BLAS threads (``None`` or 0: as they are).
    """
    data = plan.data
    with _thread_limit(n_threads or None, blas=True):
        t0 = time.perf_counter()
        trained = _train(data, n_checkpoints=plan.n_checkpoints, random_state=random_state,
                         verbose=verbose, chosen=plan.chosen)
        _say(verbose, f"{data.name}: {len(data.y_train)} train / {len(data.y_test)} test, "
                      f"model trained in {time.perf_counter() - t0:.1f}s "
                      f"({len(trained[2].states)} checkpoints)")

        lds_gt, loo_gt = compute_ground_truth(
            data, n_subsets=plan.n_subsets, subset_fraction=subset_fraction,
            n_loo=plan.n_loo, cache_dir=plan.cache_dir, n_jobs=n_jobs,
            random_state=random_state, verbose=verbose)

        noisy = None
        if auc and data.task == "classification":  # label noise needs labels
            base = data.name.removesuffix("-noisy")
            noisy = _train(load_setting(base + "-noisy", random_state=random_state,
                                        n_train=n_train, n_test=n_test),
                           n_checkpoints=plan.n_checkpoints, random_state=random_state,
                           verbose=verbose, chosen=plan.chosen)
        return _run_methods(plan.chosen, trained, noisy, lds_gt, loo_gt, device=device,
                            random_state=random_state, verbose=verbose)


def run_benchmark(setting, *, methods=None, n_subsets=50, subset_fraction=0.5, n_loo="auto",
                  auc=True, n_train=None, n_test=None, n_checkpoints=5, cache_dir=None,
                  n_jobs=-1, n_threads=1, random_state=0, device=None, verbose=1):
    """Run attribution methods on a benchmark setting and score them against retraining.

    Every option is checked, and the setting loaded, before anything is trained.

    Parameters
    ----------
    setting : str
        A name from :func:`skdattri.datasets.list_settings` (classification settings).
    methods : list of str, default=None
        Method names (see :func:`list_methods`); ``None`` runs every method that applies to
        the setting.
    n_subsets : int, default=50
        Retrained models of the LDS ground truth (at least 2).
    subset_fraction : float, default=0.5
        Fraction of the training set in each LDS subset.
    n_loo : int or "auto", default="auto"
        Training samples removed one at a time for the LOO ground truth (0, or at least
        2). ``"auto"``: 100 for scikit-learn models (deterministic, cheap retraining),
        0 for neural nets (a single removal is below their seed-to-seed noise); 0 skips
        LOO.
    auc : bool, default=True
        Also measure mislabel-detection AUC on the ``-noisy`` variant (the model is
        retrained on the noisy labels and every method fitted again).
    n_train, n_test : int, default=None
        Sizes passed to :func:`~skdattri.datasets.load_setting` (None: the setting's own).
    n_checkpoints : int, default=5
        Training checkpoints kept for TracIn.
    cache_dir : str or path-like, default=None
        Where ground truth is cached (``None``: :func:`default_cache_dir`); it must be
        a writable folder, or creatable.
    n_jobs : int, default=-1
        Parallel retraining jobs for the ground truth (joblib).
    n_threads : int or None, default=1
        Torch and BLAS threads for the whole run: training, retraining in this process
        and the methods (``None`` or 0: leave them as they are).
        One thread gives stable timings, comparable with ``benchmarks/compare_dattri.py``;
        on a busy machine, multithreaded LAPACK calls can stall for seconds waiting for
        a descheduled thread (a ``LogisticRegression`` fit took 26 s instead of 0.6 s).
    random_state : int, default=0
        Seeds the setting, the training, the ground truth and the attributors.
    device : str, default=None
        Device passed to the attributors (``None``: their default, CUDA when available);
        one torch cannot use raises a ``ValueError`` at once.
    verbose : int, default=1
        Progress messages and bars on standard error (training epochs, retrains,
        methods).

    Returns
    -------
    records : list of dict
        One per method, with keys ``method``, ``params``, ``lds``, ``loo``, ``auc``,
        ``fit_seconds``, ``transform_seconds``, ``peak_memory_mb`` (``None`` where a
        metric does not apply), ``setting`` and ``dattri_published_lds`` (dattri's
        published LDS of the method on the setting, or ``None``; see
        :data:`~skdattri.benchmark.DATTRI_PUBLISHED_LDS`).

    Raises
    ------
    ValueError
        For an unknown setting or method, a method that does not apply, an option out
        of range, an unusable device or cache folder -- before any training.

    See Also
    --------
    format_table, write_json, plot_results : Present the records.
    compute_ground_truth, train_with_checkpoints : The steps, usable on their own.

    Examples
    --------
    >>> import tempfile
    >>> from skdattri.benchmark import format_table, run_benchmark
    >>> records = run_benchmark("digits-lr", methods=["grad-dot", "knn-shapley"],
    ...                         n_train=100, n_test=10, n_subsets=3, n_loo=0, auc=False,
    ...                         n_jobs=1, cache_dir=tempfile.mkdtemp(), verbose=0)
    >>> [(r["method"], r["loo"], r["auc"]) for r in records]
    [('grad-dot', None, None), ('knn-shapley', None, None)]
    >>> print(format_table(records).splitlines()[0])
    method         LDS  LOO  AUC  fit s  transform s  peak MB
    """
    plan = _prepare(setting, methods=methods, n_subsets=n_subsets,
                    subset_fraction=subset_fraction, n_loo=n_loo, n_train=n_train,
                    n_test=n_test, n_checkpoints=n_checkpoints, cache_dir=cache_dir,
                    n_jobs=n_jobs, n_threads=n_threads, random_state=random_state,
                    device=device)
    return _execute(plan, subset_fraction=subset_fraction, auc=auc, n_train=n_train,
                    n_test=n_test, n_jobs=n_jobs, n_threads=n_threads,
                    random_state=random_state, device=device, verbose=verbose)
