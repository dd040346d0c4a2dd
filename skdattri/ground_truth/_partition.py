"""Ground truth retrained in shards (``python -m skdattri retrain``) and merged.

The work list of a ground truth (:mod:`~skdattri.ground_truth._plan`) is cut into
``k`` contiguous shards; shard ``i`` of ``k`` (1-based) retrains only its own part, so
``k`` cluster jobs cover the list exactly once. Everything a run writes lives in one
output folder ``DIR``:

- ``retrain-<kind>.json`` -- the run's arguments (setting, sizes, subsets or removed
  indices, seeds' ``random_state``, target, number of shards), written by the first
  shard and checked by every later one, so shards of different runs cannot mix;
- ``cache/`` -- every finished retrain (the ``memory=`` cache of
  :func:`~skdattri.ground_truth.lds_ground_truth`): a shard restarted with ``resume``
  refits only what is missing;
- ``models/<kind>-<group>-<repeat>.pt`` (or ``.joblib``) -- with ``save_models``, each
  retrained model (a skorch net's state dict or the fitted estimator), usable as a TRAK
  ensemble or a checkpoint list (:func:`load_retrained_models`);
- ``shards/<kind>-<i>-of-<k>.npz`` -- a finished shard's values and provenance;
- ``ground-truth-<kind>.npz`` -- written by :func:`merge_shards`: the same
  :class:`~skdattri.ground_truth.LDSGroundTruth` / ``LOOGroundTruth`` that one
  unpartitioned call of ``lds_ground_truth`` / ``loo_ground_truth`` returns.

Every file is written atomically (:mod:`~skdattri.ground_truth._store`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from sklearn.utils import Bunch
from skorch import NeuralNet

from ._cache import RetrainCache, entry_key
from ._plan import lds_plan, lds_result, loo_plan, loo_result
from ._retrain import Measure, model_to_retrain, retrain_keys, run_retrains
from ._store import _atomic, read_model, read_npz, write_npz
from ._targets import query_targets

__all__ = ["load_retrained_models", "merge_shards", "parse_partition", "prepare_shard",
           "run_shard", "shard_groups"]

KINDS = ("lds", "loo")


def parse_partition(text):
    """``(i, k)`` of a ``"i/k"`` shard argument (1 <= i <= k); ``ValueError`` otherwise."""
    parts = str(text).split("/")
    try:
        i, k = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--partition {text!r}: expected I/K with integers, e.g. 2/5 "
                         "(shard 2 of 5).") from None
    if k < 1 or not 1 <= i <= k:
        raise ValueError(f"--partition {text}: need 1 <= I <= K, got I={i}, K={k}.")
    return i, k


def shard_groups(n_groups, i, k):
    """Work-list entries of shard ``i`` of ``k``: contiguous, and the ``k`` shards cover
    ``range(n_groups)`` exactly once, in order."""
    return np.array_split(np.arange(n_groups), k)[i - 1]


def _spec_path(out, kind):
    return Path(out) / f"retrain-{kind}.json"


def _shard_path(out, kind, i, k):
    return Path(out) / "shards" / f"{kind}-{i}-of-{k}.npz"


def _plan(spec):
    """``(masks or indices, removed, seeds)`` of a run spec."""
    if spec["kind"] == "lds":
        return lds_plan(spec["n_train"], spec["n_subsets"], spec["subset_fraction"],
                        spec["n_repeats"], spec["random_state"])
    return loo_plan(spec["n_train"], spec["indices"], spec["n_repeats"],
                    spec["random_state"])


def _check_same_run(path, spec):
    """Raise when ``path`` holds the spec of a different run."""
    old = json.loads(Path(path).read_text())
    differ = sorted(key for key in set(old) | set(spec) if old.get(key) != spec.get(key))
    if differ:
        shown = ", ".join(f"{key}={old.get(key)!r} there, {spec.get(key)!r} here"
                          for key in differ[:3])
        raise ValueError(f"{path.parent} holds another {spec['kind']} run ({shown}); "
                         "use another --out or the same arguments.")


def _model_paths(out, kind, groups, n_repeats, suffix):
    return [[Path(out) / "models" / f"{kind}-{g:05d}-{r}{suffix}" for r in range(n_repeats)]
            for g in groups]


def prepare_shard(out, spec, i, estimator, data, *, resume=False, save_models=False):
    """Check shard ``i`` of a run before anything is trained; return its work.

    Parameters
    ----------
    out : path
        The output folder (created when missing).
    spec : dict
        The run's arguments: ``setting``, ``kind``, ``n_train``, ``n_test``,
        ``n_subsets`` and ``subset_fraction`` (LDS) or ``indices`` (LOO),
        ``n_repeats``, ``random_state``, ``target``, ``n_shards`` (JSON-able).
    i : int
        The shard, in ``1..spec["n_shards"]``.
    estimator, data
        The model to retrain and ``(X_train, y_train, X_test, y_test)``.
    resume : bool
        Reuse this shard's finished retrains; without it a shard that has some
        raises, so a rerun never mixes in stale results by accident.
    save_models : bool
        Save every retrained model of the shard under ``models/``.

    Raises
    ------
    ValueError
        Naming the problem: more shards than retrains, an output folder that cannot
        be written or holds another run, finished work without ``resume``.
    """
    out = Path(out)
    kind, k = spec["kind"], spec["n_shards"]
    _, removed, seeds = _plan(spec)
    if k > len(removed):
        raise ValueError(f"--partition {i}/{k}: {k} shards for {len(removed)} retrains; "
                         f"use at most {len(removed)} shards.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot create it ({exc.strerror or exc}).") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the folder is not writable.")
    if _spec_path(out, kind).exists():
        _check_same_run(_spec_path(out, kind), spec)
    groups = shard_groups(len(removed), i, k)
    estimator = model_to_retrain(estimator)
    X_train, y_train, X_test, y_test = data
    measure = Measure(query_targets, X_test, y_test, spec["target"])
    shard_removed = [removed[g] for g in groups]
    cache = RetrainCache(out / "cache")
    _, _, keys = retrain_keys(estimator, (X_train, y_train), shard_removed, seeds, measure)
    n_done = sum(cache.path(key).exists() for row in keys for key in row)
    shard_file = _shard_path(out, kind, i, k)
    if not resume and (n_done or shard_file.exists()):
        raise ValueError(f"shard {i}/{k} of the {kind} run in {out} already has {n_done} "
                         "finished retrains; pass --resume to reuse them, or another --out.")
    suffix = ".pt" if isinstance(estimator, NeuralNet) else ".joblib"  # see write_model
    paths = _model_paths(out, kind, groups, len(seeds), suffix) if save_models else None
    return Bunch(out=out, spec=spec, i=i, groups=groups, removed=shard_removed, seeds=seeds,
                 estimator=estimator, train=(X_train, y_train), measure=measure,
                 model_paths=paths, n_done=n_done)


def run_shard(work, *, n_jobs=None, verbose=0):
    """Retrain the shard prepared by :func:`prepare_shard` and save its results.

    Returns a Bunch with ``path`` (the shard file), ``n_fitted`` and ``n_cached``.
    """
    spec, out = work.spec, work.out
    with _atomic(_spec_path(out, spec["kind"])) as f:
        f.write((json.dumps(spec, sort_keys=True, indent=1) + "\n").encode())
    values, provenance = run_retrains(
        work.estimator, work.train, work.removed, work.seeds, work.measure, n_jobs=n_jobs,
        memory=out / "cache", verbose=verbose, random_state=spec["random_state"],
        desc=f"{spec['kind']} shard {work.i}/{spec['n_shards']}",
        model_paths=work.model_paths)
    n_cached = int(sum(sum(row) for row in provenance["from_cache"]))
    path = _shard_path(out, spec["kind"], work.i, spec["n_shards"])
    write_npz(path, {"groups": work.groups, "values": values,
                     "provenance": np.array(json.dumps(provenance, sort_keys=True))})
    return Bunch(path=path, n_fitted=int(values.shape[0] * values.shape[1]) - n_cached,
                 n_cached=n_cached)


_SHARED = ("estimator", "estimator_fingerprint", "data_fingerprint", "measure_fingerprint",
           "seeds")
_PER_GROUP = ("removed_fingerprints", "keys", "from_cache")


def _merged_provenance(parts, path):
    first = parts[0]
    for part in parts[1:]:
        differ = [key for key in _SHARED if part[key] != first[key]]
        if differ:
            raise ValueError(f"{path}: the shards were retrained with different "
                             f"{', '.join(differ)}; rerun the stale shards.")
    return {**{key: first[key] for key in _SHARED},
            **{key: [row for part in parts for row in part[key]] for key in _PER_GROUP}}


def _merge_kind(out, kind):
    spec = json.loads(_spec_path(out, kind).read_text())
    k = spec["n_shards"]
    paths = [_shard_path(out, kind, i, k) for i in range(1, k + 1)]
    missing = [f"{i}/{k}" for i, p in enumerate(paths, 1) if not p.exists()]
    if missing:
        raise ValueError(f"{out}: the {kind} run lacks shard{'s' * (len(missing) > 1)} "
                         f"{', '.join(missing)}; run them (--partition I/{k}) first.")
    shards = [read_npz(p) for p in paths]
    extra, removed, _ = _plan(spec)
    for i, shard in enumerate(shards, 1):
        if not np.array_equal(shard["groups"], shard_groups(len(removed), i, k)):
            raise ValueError(f"{paths[i - 1]} does not hold shard {i}/{k} of this run.")
    provenance = _merged_provenance(
        [json.loads(str(shard["provenance"])) for shard in shards], out)
    if provenance["removed_fingerprints"] != [entry_key(rows) for rows in removed]:
        raise ValueError(f"{out}: the shards left out other rows than "
                         f"retrain-{kind}.json describes; rerun them.")
    values = np.concatenate([shard["values"] for shard in shards])
    provenance["target"] = spec["target"]
    if kind == "lds":
        return lds_result(extra, values, spec["target"], provenance)
    return loo_result(extra, values, spec["target"], spec["n_train"], provenance)


def merge_shards(out, kind=None):
    """Assemble the ground truth of every finished run in ``out``; save it there.

    Parameters
    ----------
    out : path
        The output folder of ``python -m skdattri retrain``.
    kind : {"lds", "loo"} or None
        Merge only this run (None: every run the folder holds).

    Returns
    -------
    merged : list of (kind, path, ground truth)

    Raises
    ------
    ValueError
        When the folder holds no run, or a run lacks shards (named), or its shards
        disagree with each other or with the run's arguments.
    """
    out = Path(out)
    kinds = [kind] if kind else [k for k in KINDS if _spec_path(out, k).exists()]
    if not kinds or not all(_spec_path(out, k).exists() for k in kinds):
        wanted = " or ".join(_spec_path(out, k).name for k in (kinds or KINDS))
        raise ValueError(f"{out} holds no retrain run (no {wanted}).")
    merged = []
    for k in kinds:
        gt = _merge_kind(out, k)
        path = out / f"ground-truth-{k}.npz"
        gt.save(path)
        merged.append((k, path, gt))
    return merged


def load_retrained_models(directory, kind="lds"):
    """The models saved by ``python -m skdattri retrain ... --save-models``.

    Parameters
    ----------
    directory : str or path-like
        The ``--out`` folder of the run.
    kind : {"lds", "loo"}, default="lds"
        Which run's models.

    Returns
    -------
    models : list
        In work-list order (LDS: one per subset, the rows of the ground truth's
        ``masks``; LOO: the full model first, then one per removed index), each a
        state dict (skorch nets) or a fitted estimator: what the ``checkpoints``
        parameter of ``TRAK`` or ``TracIn`` takes.

    Raises
    ------
    ValueError
        When the folder holds no such run or models are missing (it says how many).

    Examples
    --------
    >>> import tempfile
    >>> from skdattri.cli import main
    >>> from skdattri.ground_truth import load_retrained_models
    >>> out = tempfile.mkdtemp()
    >>> main(["retrain", "digits-lr", "--n-train", "30", "--n-test", "5", "--n-subsets",
    ...       "2", "--n-jobs", "1", "--save-models", "--out", out, "--quiet"])
    ... # doctest: +ELLIPSIS
    lds shard 1/1 of digits-lr: 2 retrains (2 fitted, 0 from cache) in ...
    0
    >>> [type(m).__name__ for m in load_retrained_models(out)]
    ['LogisticRegression', 'LogisticRegression']
    """
    directory = Path(directory)
    if not _spec_path(directory, kind).exists():
        raise ValueError(f"{directory} holds no {kind} run (no retrain-{kind}.json).")
    spec = json.loads(_spec_path(directory, kind).read_text())
    _, removed, seeds = _plan(spec)
    files = {p.stem: p for p in (directory / "models").glob(f"{kind}-*")
             if not p.name.startswith(".")}
    names = [f"{kind}-{g:05d}-{r}" for g in range(len(removed)) for r in range(len(seeds))]
    missing = [name for name in names if name not in files]
    if missing:
        raise ValueError(f"{directory}: {len(missing)} of {len(names)} {kind} models are "
                         f"missing (first: {missing[0]}); rerun their shards with "
                         "--resume --save-models.")
    return [read_model(files[name]) for name in names]
