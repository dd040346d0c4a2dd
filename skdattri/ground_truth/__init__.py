"""Ground truth for attribution metrics, measured by retraining the model.

Attribution scores can only be judged against what actually happens when the
training set changes.  This package retrains ``sklearn.clone(estimator)`` on
subsets of the training data and records the *target* (per-sample loss or
margin) of every query sample under every retrained model:

- :func:`lds_ground_truth` retrains on random subsets (linear datamodeling
  score, LDS), giving an :class:`LDSGroundTruth`;
- :func:`loo_ground_truth` retrains without one training sample at a time
  (leave-one-out, LOO), giving an :class:`LOOGroundTruth`.

Retraining runs through :mod:`joblib` (``n_jobs`` and any joblib backend, so
``with joblib.parallel_config(backend="dask")`` spreads the fits over a Dask
cluster). With ``memory=`` every *finished* fit is cached on disk, keyed in the
calling process, so an interrupted run resumes without redoing finished fits: a fit
interrupted by Ctrl-C (also one whose library swallowed the ``KeyboardInterrupt``)
or lost with a dying worker stores nothing, and ``verify=`` refits a sample of the
cached fits to check them. Both result types save to and load from a single
``.npz`` file, written atomically, with the provenance of their values.

``python -m skdattri retrain`` runs the same retrains in shards (one per cluster job,
resumable, optionally on Dask) and merges them into the same result; with
``--save-models`` :func:`load_retrained_models` returns the retrained models.

The package is cut by concern: ``_containers`` (the two result types and their
file format), ``_targets`` (the per-query values of a fitted model),
``_plan`` (the work list and its result), ``_partition`` (shards and their merge),
``_retrain`` (the retraining kernel, also used by
:func:`skdattri.metrics.brittleness`), ``_fingerprint`` (cache keys without
pickling), ``_cache`` (the retrain cache), ``_store`` (atomic, validated ``.npz``
files), ``_interrupt`` (swallowed Ctrl-C, orphaned workers) and ``_api`` (the two
functions).
"""

from ._api import lds_ground_truth, loo_ground_truth
from ._containers import LDSGroundTruth, LOOGroundTruth, load_ground_truth
from ._partition import load_retrained_models

__all__ = [
    "LDSGroundTruth",
    "LOOGroundTruth",
    "lds_ground_truth",
    "load_ground_truth",
    "load_retrained_models",
    "loo_ground_truth",
]
