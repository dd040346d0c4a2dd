"""``python -m skdattri retrain``: a setting's ground truth, retrained in shards.

``retrain SETTING --kind lds|loo --partition I/K --out DIR`` retrains the setting's
model on shard ``I`` of ``K`` of its LDS subsets (or LOO removals), so ``K`` cluster
jobs cover the work exactly once; ``--resume`` reuses finished retrains, ``--n-jobs``
runs them in parallel, ``--scheduler ADDRESS`` sends them to a Dask cluster, and
``--save-models`` keeps every retrained model. ``retrain merge DIR`` (or ``--merge``
after the last shard) assembles the ground truth, identical to one unpartitioned
:func:`~skdattri.ground_truth.lds_ground_truth` call. The folder's layout is described
in :mod:`skdattri.ground_truth._partition`.

Every argument is checked before anything is trained; a bad one ends the command with a
one-line error and exit status 2.
"""

from __future__ import annotations

import contextlib
import time

__all__ = ["add_retrain_parser", "retrain_command"]


def add_retrain_parser(sub):
    """Add the ``retrain`` command to the ``sub`` parsers of :mod:`skdattri.cli`."""
    p = sub.add_parser(
        "retrain", help="retrain a setting's model for its ground truth, in shards",
        description="Retrain a benchmark setting's model on its LDS subsets (or LOO "
        "removals), only shard I of K of the work, caching every finished retrain in "
        "DIR; 'retrain merge DIR' assembles the ground truth once every shard is done.")
    p.add_argument("setting", help="setting name (see 'benchmark --list'), or 'merge'")
    p.add_argument("directory", nargs="?", help="with merge: the --out folder of the run")
    p.add_argument("--kind", choices=["lds", "loo"], default=None,
                   help="LDS subsets (default) or leave-one-out removals; with merge: "
                   "only this run")
    p.add_argument("--partition", default="1/1", metavar="I/K",
                   help="run shard I of K (1 <= I <= K; default 1/1, everything)")
    p.add_argument("--out", metavar="DIR", help="output folder (cache, shards, models)")
    p.add_argument("--resume", action="store_true",
                   help="reuse this shard's finished retrains (refit only the rest)")
    p.add_argument("--n-jobs", type=int, default=-1,
                   help="parallel retrains (default -1 = all cores or Dask workers)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="Dask scheduler address, e.g. tcp://10.0.0.1:8786 (joblib's dask "
                   "backend)")
    p.add_argument("--save-models", action="store_true",
                   help="save every retrained model under DIR/models (state dict or "
                   "joblib file)")
    p.add_argument("--merge", action="store_true",
                   help="after this shard, assemble the ground truth (all shards done)")
    p.add_argument("--n-subsets", type=int, default=None,
                   help="LDS subsets (default: the setting's, e.g. 100 for mnist10-*)")
    p.add_argument("--subset-fraction", type=float, default=None,
                   help="training fraction per LDS subset (default: the setting's, 0.5)")
    p.add_argument("--n-loo", type=int, default=None,
                   help="LOO removals, drawn by --random-state (default: the setting's)")
    p.add_argument("--n-train", type=int, default=None, help="training samples")
    p.add_argument("--n-test", type=int, default=None, help="query samples")
    p.add_argument("--target", choices=["loss", "margin"], default="loss")
    p.add_argument("--random-state", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(subparser=p)
    return p


def _positive(name, value):
    if value is not None and value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}.")


def _load(args):
    from .datasets import list_settings, load_setting

    if args.setting not in list_settings():
        raise ValueError(f"Unknown setting {args.setting!r}; available: "
                         f"{', '.join(list_settings())}.")
    try:
        return load_setting(args.setting, random_state=args.random_state,
                            n_train=args.n_train, n_test=args.n_test)
    except (FileNotFoundError, ImportError) as exc:
        raise ValueError(f"Setting {args.setting!r} cannot be loaded: {exc}") from None


def _spec(args, data, n_shards):
    """The run's arguments (JSON-able), defaults taken from the setting."""
    from .benchmark._cache import loo_indices, resolve_n_loo

    kind, defaults = args.kind or "lds", data.ground_truth_spec
    n_train = len(data.y_train)
    spec = {"setting": data.name, "kind": kind, "n_train": n_train,
            "n_test": len(data.y_test), "setting_n_train": args.n_train,
            "setting_n_test": args.n_test, "n_repeats": 1,
            "random_state": args.random_state, "target": args.target, "n_shards": n_shards}
    if kind == "lds":
        n_subsets = defaults["n_subsets"] if args.n_subsets is None else args.n_subsets
        fraction = (defaults["subset_fraction"] if args.subset_fraction is None
                    else args.subset_fraction)
        if n_subsets < 2:
            raise ValueError(f"--n-subsets must be at least 2, got {n_subsets}.")
        if not 0 < fraction < 1:
            raise ValueError(f"--subset-fraction must lie in (0, 1), got {fraction}.")
        return {**spec, "n_subsets": int(n_subsets), "subset_fraction": float(fraction)}
    n_loo = args.n_loo if args.n_loo is not None else defaults["n_loo"]
    n_loo = resolve_n_loo(data, n_loo)
    if n_loo < 1:
        raise ValueError(f"Setting {data.name!r} has no LOO ground truth by default (its "
                         "retraining is noisier than one removal); pass --n-loo N.")
    if n_loo > n_train:
        raise ValueError(f"--n-loo {n_loo} exceeds the {n_train} training samples.")
    indices = loo_indices(n_train, n_loo, args.random_state)  # the benchmark's LOO rows
    return {**spec, "indices": [int(j) for j in indices]}


@contextlib.contextmanager
def _scheduler(address):
    """Run joblib on the Dask cluster at ``address`` (nothing when None)."""
    if address is None:
        yield
        return
    import joblib

    try:
        from distributed import Client
    except ImportError:
        raise ValueError("--scheduler needs dask.distributed: pip install "
                         "'skdattri[dask]'") from None
    try:
        client = Client(address, timeout=10)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"--scheduler {address}: cannot connect "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})."
                         ) from None
    with client, joblib.parallel_config(backend="dask"):
        yield


def _print_merged(merged):
    for kind, path, gt in merged:
        print(f"{kind} ground truth {gt!r} written to {path}")


def _merge(args):
    from .ground_truth._partition import merge_shards

    if args.directory is None:
        raise ValueError("retrain merge needs the DIR of the run (retrain merge DIR).")
    _print_merged(merge_shards(args.directory, kind=args.kind))
    return 0


def retrain_command(args):
    """Run ``python -m skdattri retrain`` (``args`` from :func:`add_retrain_parser`)."""
    from .ground_truth._partition import merge_shards, parse_partition, prepare_shard, run_shard

    parser = args.subparser
    if args.setting == "merge":
        try:
            return _merge(args)
        except ValueError as exc:
            parser.error(str(exc))
    stack = contextlib.ExitStack()
    try:
        if args.directory is not None:
            raise ValueError(f"unexpected argument {args.directory!r} (only merge takes DIR).")
        if args.out is None:
            raise ValueError("retrain needs --out DIR (where the shards are saved).")
        i, k = parse_partition(args.partition)
        for name in ("n_subsets", "n_train", "n_test"):
            _positive("--" + name.replace("_", "-"), getattr(args, name))
        if args.n_jobs == 0:
            raise ValueError("--n-jobs must be a non-zero integer (-1 = all cores).")
        data = _load(args)
        spec = _spec(args, data, k)
        work = prepare_shard(args.out, spec, i, data.estimator,
                             (data.X_train, data.y_train, data.X_test, data.y_test),
                             resume=args.resume, save_models=args.save_models)
        stack.enter_context(_scheduler(args.scheduler))
    except ValueError as exc:
        stack.close()
        parser.error(str(exc))
    t0 = time.perf_counter()
    with stack:
        done = run_shard(work, n_jobs=args.n_jobs, verbose=0 if args.quiet else 1)
    print(f"{spec['kind']} shard {i}/{k} of {spec['setting']}: {len(work.groups)} retrains "
          f"({done.n_fitted} fitted, {done.n_cached} from cache) in "
          f"{time.perf_counter() - t0:.1f}s, written to {done.path}")
    if args.merge:
        try:
            _print_merged(merge_shards(args.out, kind=spec["kind"]))
        except ValueError as exc:
            parser.error(str(exc))
    return 0
