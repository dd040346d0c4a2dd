"""Ground truth of a benchmark setting (LDS, LOO), computed by retraining and cached on disk.

Each ground truth is an ``.npz`` named after the setting, its sizes and a fingerprint of
the data and the model recipe; every finished retrain is cached under ``retrains/`` by
``memory=`` of :func:`~skdattri.ground_truth.lds_ground_truth` (never an interrupted
one), so an interrupted run resumes where it stopped. A damaged ground-truth file is
reported in one line and computed again.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np

from ..ground_truth import LDSGroundTruth, LOOGroundTruth, lds_ground_truth, loo_ground_truth
from ..ground_truth._fingerprint import fingerprint
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
    """Fingerprint of everything the ground truth depends on: data and model recipe."""
    return fingerprint(setting.name, setting.X_train, setting.y_train, setting.X_test,
                       setting.y_test, setting.estimator, random_state)[:16]


def _cached_or_computed(path, container, compute):
    """``(ground truth, loaded)``: the file at ``path``, or ``compute()`` saved there.

    A file that cannot be loaded (truncated, damaged) is reported in one warning line
    and replaced.
    """
    if path.exists():
        try:
            return container.load(path), True
        except ValueError as exc:
            warnings.warn(f"{str(exc).splitlines()[0]} Computing it again.", UserWarning,
                          stacklevel=3)
    gt = compute()
    gt.save(path)
    return gt, False


def _lds_ground_truth(setting, *, n_subsets, subset_fraction, random_state, n_jobs,
                      cache_dir, verbose):
    key = _setting_key(setting, random_state)
    path = cache_dir / f"{setting.name}-lds-{n_subsets}x{subset_fraction:g}-{key}.npz"
    return _cached_or_computed(path, LDSGroundTruth, lambda: lds_ground_truth(
        setting.estimator, setting.X_train, setting.y_train, setting.X_test, setting.y_test,
        n_subsets=n_subsets, subset_fraction=subset_fraction, n_jobs=n_jobs,
        random_state=random_state, memory=cache_dir / "retrains", verbose=verbose))


def resolve_n_loo(setting, n_loo):
    """``n_loo="auto"``: 100 LOO removals for scikit-learn models, none for nets (their
    retraining noise is larger than one removal's effect)."""
    if n_loo == "auto":
        return 0 if _is_torch(setting) else 100
    return n_loo


def loo_indices(n_train, n_loo, random_state):
    """The training rows a setting's LOO ground truth removes (sorted, seeded)."""
    return np.sort(np.random.RandomState(random_state).choice(n_train, n_loo, replace=False))


def _loo_ground_truth(setting, *, n_loo, random_state, n_jobs, cache_dir, verbose):
    n_train = len(setting.y_train)
    n_loo = min(int(n_loo), n_train)
    key = _setting_key(setting, random_state)
    path = cache_dir / f"{setting.name}-loo-{n_loo}-{key}.npz"
    indices = loo_indices(n_train, n_loo, random_state)
    return _cached_or_computed(path, LOOGroundTruth, lambda: loo_ground_truth(
        setting.estimator, setting.X_train, setting.y_train, setting.X_test, setting.y_test,
        indices=indices, n_jobs=n_jobs, random_state=random_state,
        memory=cache_dir / "retrains", verbose=verbose))


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
        named after the setting, the sizes and a fingerprint of the data and the model
        recipe, and every finished retrain is cached under ``retrains/`` (an
        interrupted run resumes; see :func:`~skdattri.ground_truth.lds_ground_truth`).
    n_jobs : int, default=-1
        Parallel retraining jobs.
    random_state : int, default=0
        Seeds the subsets, the removed indices and the retraining.
    verbose : int, default=0
        Progress bars (one tick per retrain) and messages on standard error.

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
    n_loo = resolve_n_loo(setting, n_loo)
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

