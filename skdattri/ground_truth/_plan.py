"""The work list of a ground truth and how its measured values become the result.

A ground truth is a list of retrains -- training rows to leave out, each fitted with
every training seed -- followed by one step that turns the measured query targets
into an :class:`~skdattri.ground_truth.LDSGroundTruth` or
:class:`~skdattri.ground_truth.LOOGroundTruth`. Both halves are written once, here:
:func:`~skdattri.ground_truth.lds_ground_truth` and
:func:`~skdattri.ground_truth.loo_ground_truth` run the whole list in one call, and
``python -m skdattri retrain`` runs it in shards on a cluster and assembles the same
result (:mod:`~skdattri.ground_truth._partition`).
"""

from __future__ import annotations

import numpy as np
from sklearn.utils import check_random_state

from ._containers import LDSGroundTruth, LOOGroundTruth

__all__ = ["draw_streams", "lds_plan", "lds_result", "loo_plan", "loo_result"]


def draw_streams(random_state, n_repeats):
    """Split ``random_state`` into a subset stream and the ``n_repeats`` training seeds.

    The two come from separate streams, so the subsets do not depend on
    ``n_repeats`` and the first seeds do not depend on how many there are.
    """
    subset_seed, seed_seed = check_random_state(random_state).randint(
        np.iinfo(np.int32).max, size=2
    )
    seeds = np.random.RandomState(seed_seed).randint(np.iinfo(np.int32).max, size=n_repeats)
    return np.random.RandomState(subset_seed), seeds


def lds_plan(n_train, n_subsets, subset_fraction, n_repeats, random_state):
    """``(masks, removed, seeds)`` of an LDS ground truth.

    ``masks`` (n_subsets, n_train) marks each subset's rows; ``removed[s]`` lists the
    sorted rows subset ``s`` leaves out. A ``ValueError`` names a fraction that keeps
    no row or every row.
    """
    subset_size = int(round(subset_fraction * n_train))
    if not 1 <= subset_size <= n_train - 1:
        raise ValueError(
            f"subset_fraction={subset_fraction} gives subsets of {subset_size} of "
            f"{n_train} training samples; it must keep between 1 and n_train - 1."
        )
    rng, seeds = draw_streams(random_state, n_repeats)
    # One row of uniform keys per subset: the first m rows do not depend on n_subsets.
    keys = rng.random_sample((n_subsets, n_train))
    order = np.argsort(keys, axis=1, kind="stable")
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    np.put_along_axis(masks, order[:, :subset_size], True, axis=1)
    removed = [np.sort(order[s, subset_size:]) for s in range(n_subsets)]
    return masks, removed, seeds


def check_loo_indices(indices, n_train):
    """``indices`` as int64 in ``[0, n_train)`` (negative ones counted from the end)."""
    if indices is None:
        return np.arange(n_train, dtype=np.int64)
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
        raise ValueError("indices must be a 1-d array of integer training indices.")
    if indices.size and (indices.min() < -n_train or indices.max() >= n_train):
        raise ValueError(f"indices must lie in [0, {n_train}) (or [-{n_train}, 0), counted "
                         f"from the end), got {indices}.")
    indices = np.where(indices < 0, indices + n_train, indices).astype(np.int64)
    if np.unique(indices).size != indices.size:  # before any retrain, not after them all
        raise ValueError("indices must not contain duplicates.")
    return indices


def loo_plan(n_train, indices, n_repeats, random_state):
    """``(indices, removed, seeds)`` of a LOO ground truth: the full model first (no row
    removed), then one retrain without each index."""
    indices = check_loo_indices(indices, n_train)
    _, seeds = draw_streams(random_state, n_repeats)
    removed = [np.zeros(0, dtype=np.int64)] + [np.array([j], dtype=np.int64) for j in indices]
    return indices, removed, seeds


def lds_result(masks, values, target, provenance):
    """The :class:`LDSGroundTruth` of ``values`` (n_subsets, n_repeats, n_test)."""
    return LDSGroundTruth(masks, np.asarray(values).mean(axis=1), target=target,
                          provenance=provenance)


def loo_result(indices, values, target, n_train, provenance):
    """The :class:`LOOGroundTruth` of ``values`` (1 + n_removed, n_repeats, n_test):
    each leave-one-out model minus the full model of the same seed, averaged over seeds."""
    values = np.asarray(values)
    changes = (values[1:] - values[:1]).mean(axis=1)
    return LOOGroundTruth(indices, changes, target=target, n_train=n_train,
                          provenance=provenance)
