"""Benchmark runner: every attribution method on one setting, judged by retraining.

``python -m skdattri benchmark SETTING`` (see :mod:`skdattri.cli`) calls
:func:`run_benchmark`, which

1. loads the setting (:func:`skdattri.datasets.load_setting`) and trains its model once,
   keeping training checkpoints for TracIn (state dicts kept at evenly spaced epochs by a
   :class:`~skdattri.callbacks.TrainingRecorder`; for scikit-learn models, refits with
   increasing ``max_iter``): :func:`train_with_checkpoints`;
2. computes -- or loads from ``cache_dir`` -- the ground truth: LDS from models retrained
   on random halves of the training set, and leave-one-out changes where retraining is
   deterministic and cheap (scikit-learn models): :func:`compute_ground_truth`;
3. runs every method of the registry :data:`METHODS` that applies to the setting, timing
   ``fit`` and ``transform`` separately and recording their peak memory;
4. scores the attributions (LDS, LOO) and, on the ``-noisy`` variant of the setting, the
   mislabel-detection AUC of each method's self-influence.

Each method is one :class:`Method` entry: a name, a factory
``(setting, fitted_model, checkpoints) -> unfitted attributor`` and a test of whether it
applies to a setting. :func:`format_table`, :func:`write_json` and :func:`plot_results`
present the records.

One module per concern: ``_registry`` (methods), ``_training`` (checkpoints), ``_cache``
(ground truth on disk), ``_memory`` (peak memory), ``_runner`` (warm-up, threads,
measurement) and ``_report`` (table, JSON, figure).
"""

from ._cache import compute_ground_truth, default_cache_dir
from ._registry import METHODS, Method, get_method, list_methods
from ._report import (
    DATTRI_PUBLISHED_LDS,
    RECORD_KEYS,
    format_table,
    plot_results,
    published_lds,
    write_json,
)
from ._runner import run_benchmark
from ._training import Checkpoints, train_with_checkpoints

__all__ = [
    "DATTRI_PUBLISHED_LDS",
    "METHODS",
    "RECORD_KEYS",
    "Checkpoints",
    "Method",
    "compute_ground_truth",
    "default_cache_dir",
    "format_table",
    "get_method",
    "list_methods",
    "plot_results",
    "published_lds",
    "run_benchmark",
    "train_with_checkpoints",
    "write_json",
]
