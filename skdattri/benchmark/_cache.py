"""Ground truth of a benchmark setting (LDS, LOO), computed by retraining and cached on disk.

Each ground truth is an ``.npz`` named after the setting, its sizes and a hash of the
data and the model recipe; every retrain is cached by :class:`joblib.Memory` under
``retrains/``, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import joblib
import numpy as np

from .._utils import _progress
from ..ground_truth import LDSGroundTruth, LOOGroundTruth, lds_ground_truth, loo_ground_truth
from ._registry import _is_torch
from ._report import _say

__all__ = ["compute_ground_truth", "default_cache_dir"]


def default_cache_dir():
    """``$SKDATTRI_CACHE`` if set, else ``~/.cache/skdattri``."""
    env = os.environ.get("SKDATTRI_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "skdattri"


def _resolve_cache_dir(cache_dir):
    """``cache_dir`` as a path, :func:`default_cache_dir` for ``None``."""
    return Path(default_cache_dir() if cache_dir is None else cache_dir).expanduser()


def _setting_key(setting, random_state):
    """Hash of everything the ground truth depends on: data and model recipe."""
    return joblib.hash((setting.name, setting.X_train, setting.y_train, setting.X_test,
                        setting.y_test, repr(setting.estimator), random_state))[:16]


def _chunks(n, size):
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _lds_ground_truth(setting, *, n_subsets, subset_fraction, random_state, n_jobs,
                      cache_dir, verbose):
    key = _setting_key(setting, random_state)
    path = cache_dir / f"{setting.name}-lds-{n_subsets}x{subset_fraction:g}-{key}.npz"
    if path.exists():
        return LDSGroundTruth.load(path), True
    memory = joblib.Memory(cache_dir / "retrains", verbose=0)
    # The first m subsets do not depend on n_subsets, so growing n_subsets in steps over
    # the cached retrains gives a progress bar at the cost of reloading finished fits.
    step = 4 * joblib.effective_n_jobs(n_jobs)
    chunks = _chunks(n_subsets, step)
    gt = None
    for _, stop in _progress(chunks, verbose=verbose, desc=f"LDS ground truth ({n_subsets} "
                             f"retrains, {step} per tick)"):
        gt = lds_ground_truth(
            setting.estimator, setting.X_train, setting.y_train, setting.X_test,
            setting.y_test, n_subsets=max(stop, 2), subset_fraction=subset_fraction,
            n_jobs=n_jobs, random_state=random_state, memory=memory,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    gt.save(path)
    return gt, False


def _loo_ground_truth(setting, *, n_loo, random_state, n_jobs, cache_dir, verbose):
    n_train = len(setting.y_train)
    n_loo = min(int(n_loo), n_train)
    key = _setting_key(setting, random_state)
    path = cache_dir / f"{setting.name}-loo-{n_loo}-{key}.npz"
    if path.exists():
        return LOOGroundTruth.load(path), True
    indices = np.sort(np.random.RandomState(random_state).choice(n_train, n_loo,
                                                                 replace=False))
    memory = joblib.Memory(cache_dir / "retrains", verbose=0)
    step = 8 * joblib.effective_n_jobs(n_jobs)
    values = []
    for start, stop in _progress(_chunks(n_loo, step), verbose=verbose,
                                 desc=f"LOO ground truth ({n_loo} retrains, {step} per tick)"):
        part = loo_ground_truth(
            setting.estimator, setting.X_train, setting.y_train, setting.X_test,
            setting.y_test, indices=indices[start:stop], n_jobs=n_jobs,
            random_state=random_state, memory=memory,
        )
        values.append(part.values)
    gt = LOOGroundTruth(indices, np.concatenate(values), target="loss", n_train=n_train)
    path.parent.mkdir(parents=True, exist_ok=True)
    gt.save(path)
    return gt, False


def compute_ground_truth(setting, *, n_subsets=50, subset_fraction=0.5, n_loo="auto",
                         cache_dir=None, n_jobs=-1, random_state=0, verbose=0):
    """LDS (and LOO) ground truth of a setting, computed once and cached on disk.

    Parameters
    ----------
    setting : Bunch
        From :func:`skdattri.datasets.load_setting`.
    n_subsets, subset_fraction : int, float
        Passed to :func:`skdattri.ground_truth.lds_ground_truth`.
    n_loo : int or "auto", default="auto"
        Removed training samples of the LOO ground truth (drawn by ``random_state``);
        ``"auto"``: 100 for scikit-learn models, 0 (no LOO) for neural nets.
    cache_dir : str or path-like, default=None
        ``None``: :func:`default_cache_dir`. The ground truth is saved as ``.npz`` files
        named after the setting, the sizes and a hash of the data and the model recipe,
        and every retrain is cached by :class:`joblib.Memory` under ``retrains/`` (an
        interrupted run resumes).
    n_jobs : int, default=-1
        Parallel retraining jobs.
    random_state : int, default=0
        Seeds the subsets, the removed indices and the retraining.
    verbose : int, default=0
        Progress bars and messages on standard error.

    Returns
    -------
    lds : LDSGroundTruth
    loo : LOOGroundTruth or None
    """
    cache_dir = _resolve_cache_dir(cache_dir)
    t0 = time.perf_counter()
    lds_gt, cached = _lds_ground_truth(setting, n_subsets=n_subsets,
                                       subset_fraction=subset_fraction,
                                       random_state=random_state, n_jobs=n_jobs,
                                       cache_dir=cache_dir, verbose=verbose)
    _say(verbose, f"LDS ground truth ({n_subsets} subsets) "
                  + ("loaded from cache" if cached else
                     f"computed in {time.perf_counter() - t0:.1f}s"))
    if n_loo == "auto":
        n_loo = 0 if _is_torch(setting) else 100
    loo_gt = None
    if n_loo and int(n_loo) >= 2:
        t0 = time.perf_counter()
        loo_gt, cached = _loo_ground_truth(setting, n_loo=n_loo, random_state=random_state,
                                           n_jobs=n_jobs, cache_dir=cache_dir,
                                           verbose=verbose)
        _say(verbose, f"LOO ground truth ({loo_gt.n_removed} removals) "
                      + ("loaded from cache" if cached else
                         f"computed in {time.perf_counter() - t0:.1f}s"))
    return lds_gt, loo_gt

