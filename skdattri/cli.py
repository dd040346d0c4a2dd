"""Command line: ``python -m skdattri [demo | benchmark ... | retrain ...]`` (or ``skdattri``).

``demo`` (the default) trains a small network on the embedded digits data, fits
Grad-Dot and TracIn over the training checkpoints, and prints the most helpful and most
harmful training samples for a few test digits.

``benchmark SETTING`` runs every attribution method on a benchmark setting and prints
LDS, LOO, mislabel AUC, fit/transform seconds and peak memory per method (see
:mod:`skdattri.benchmark`); ``benchmark --list`` lists the settings and methods. Every
argument (setting, methods, sizes, device, output, figure and cache paths) is checked
before anything is trained; a bad one ends the command with a one-line error and exit
status 2, as argparse's own errors do.

``retrain SETTING --partition I/K --out DIR`` retrains a setting's model for its ground
truth, one shard of the work per cluster job, and ``retrain merge DIR`` assembles it
(see :mod:`skdattri._cli_retrain`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from ._cli_retrain import add_retrain_parser, retrain_command

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line: ``PROG: error: MESSAGE``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


def _n_loo_arg(text):
    """``--n-loo``: ``auto`` or an integer (its range is checked with the others)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {text!r}") from None


def _check_output_file(path, option, formats=None):
    """Raise ``ValueError`` when ``path`` cannot be written (or has an unknown format)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise ValueError(f"{option} {path}: is a folder, not a file.")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: the folder {folder} does not exist.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: the folder {folder} is not writable.")
    suffix = target.suffix.lstrip(".").lower()
    if formats is not None and suffix and suffix not in formats:
        raise ValueError(f"{option} {path}: unknown figure format {suffix!r}; use one of "
                         f"{', '.join(sorted(formats))}.")


def _digit_art(x):
    """8x8 digit as two lines of block characters (coarse, for a terminal)."""
    shades = " .:-=+*#%@"
    img = np.asarray(x).reshape(8, 8)
    return ["".join(shades[min(9, int(v * 9.99))] for v in row) for row in img]


def _demo(args):
    import torch
    from sklearn.datasets import load_digits
    from skorch import NeuralNetClassifier
    from torch import nn

    from .callbacks import TrainingRecorder
    from .tracin import TracIn

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    rng = np.random.RandomState(args.random_state)
    order = rng.permutation(len(X))
    train, test = order[:1200], order[1200:]
    X_train, y_train, X_test, y_test = X[train], y[train], X[test], y[test]

    every = max(1, args.epochs // 4)  # TracIn checkpoints: every `every`-th epoch
    recorder = TrainingRecorder(epochs=list(range(every, args.epochs + 1, every)))
    torch.manual_seed(args.random_state)
    module = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    lr = 0.1
    net = NeuralNetClassifier(module, criterion=nn.CrossEntropyLoss, max_epochs=args.epochs,
                              lr=lr, batch_size=32, train_split=None, verbose=0,
                              callbacks=[recorder])
    net.fit(X_train, y_train)
    acc = float((net.predict(X_test) == y_test).mean())
    print(f"skdattri demo: MLP on digits ({len(train)} train / {len(test)} test), "
          f"test accuracy {acc:.3f}, trained in {time.perf_counter() - t0:.1f}s")

    t1 = time.perf_counter()
    grad_dot = TracIn(net, batch_size=256).fit(X_train, y_train)
    ckpts = recorder.checkpoints_
    tracin = TracIn(net, checkpoints=ckpts, learning_rates=recorder.learning_rates_,
                    batch_size=256)
    tracin.fit(X_train, y_train)
    t_fit = time.perf_counter() - t1

    queries = np.arange(args.n_queries)
    wrong = np.flatnonzero(net.predict(X_test) != y_test)
    queries = np.unique(np.r_[queries, wrong[:2]])[: args.n_queries + 2]
    t2 = time.perf_counter()
    S_dot = grad_dot.transform(X_test[queries], y_test[queries])
    S_tr = tracin.transform(X_test[queries], y_test[queries])
    t_tr = time.perf_counter() - t2
    print(f"Grad-Dot + TracIn ({len(ckpts)} checkpoints) fitted in {t_fit:.2f}s, "
          f"{len(queries)} queries scored in {t_tr:.3f}s\n")

    pred = net.predict(X_test[queries])
    k = args.top
    for row, q in enumerate(queries):
        print(f"test #{test[q]:4d}  label {y_test[q]}  predicted {pred[row]}")
        for name, S in (("Grad-Dot", S_dot), ("TracIn  ", S_tr)):
            s = S[row]
            helpful = np.argsort(-s)[:k]
            harmful = np.argsort(s)[:k]
            fmt = ", ".join
            print(f"  {name} helpful: " + fmt(f"#{train[j]}(y={y_train[j]}, {s[j]:+.3g})"
                                            for j in helpful))
            print(f"  {name} harmful: " + fmt(f"#{train[j]}(y={y_train[j]}, {s[j]:+.3g})"
                                            for j in harmful))
        j = int(np.argmax(S_tr[row]))
        left, right = _digit_art(X_test[q]), _digit_art(X_train[j])
        print("    query     most helpful (TracIn)")
        for a, b in zip(left, right):
            print(f"    {a}  {b}")
        print()
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


def _benchmark_list():
    from .benchmark import list_methods
    from .datasets import list_settings

    print("settings:")
    for name in list_settings():
        print(f"  {name}")
    print("methods:")
    rows = list_methods()
    width = max(len(name) for name, _ in rows)
    for name, description in rows:
        print(f"  {name.ljust(width)}  {description}")
    return 0


def _check_benchmark_args(args):
    """Every check of the benchmark's arguments; the plan of the run (nothing trained)."""
    from .benchmark._runner import _prepare

    if args.output:
        _check_output_file(args.output, "--output")
    if args.plot:
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
        _check_output_file(args.plot, "--plot", FigureCanvasBase.get_supported_filetypes())
    n_subsets = args.n_subsets
    if n_subsets is None:  # the setting's own ground truth (50, or 100 for mnist10-*)
        from .datasets._settings import _REGISTRY, DEFAULT_GROUND_TRUTH

        setting = _REGISTRY.get(args.setting)
        n_subsets = (setting.ground_truth if setting else DEFAULT_GROUND_TRUTH)["n_subsets"]
    return _prepare(
        args.setting, methods=args.methods, n_subsets=n_subsets,
        subset_fraction=args.subset_fraction, n_loo=args.n_loo, n_train=args.n_train,
        n_test=args.n_test, n_checkpoints=args.n_checkpoints, cache_dir=args.cache_dir,
        n_jobs=args.n_jobs, n_threads=args.threads, random_state=args.random_state,
        device=args.device)


def _benchmark(args, parser):
    if args.list:
        return _benchmark_list()
    if args.setting is None:
        parser.error("benchmark needs a SETTING (or --list)")
    from .benchmark import format_table, plot_results, write_json
    from .benchmark._runner import _execute

    try:
        plan = _check_benchmark_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    t0 = time.perf_counter()
    records = _execute(
        plan, subset_fraction=args.subset_fraction, auc=not args.no_auc,
        n_train=args.n_train, n_test=args.n_test, n_jobs=args.n_jobs,
        n_threads=args.threads or None, random_state=args.random_state,
        device=args.device, verbose=0 if args.quiet else 1,
    )
    print(format_table(records))
    print(f"total {time.perf_counter() - t0:.1f}s")
    if args.output:
        write_json(records, args.output)
        print(f"results written to {args.output}")
    if args.plot:
        plot_results(records, args.plot, title=records[0]["setting"])
        print(f"figure written to {args.plot}")
    return 0


def _build_parser():
    parser = _Parser(
        prog="python -m skdattri",
        description="Data attribution as scikit-learn estimators.",
    )
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="Grad-Dot / TracIn on digits (the default)")
    for p in (parser, demo):
        p.add_argument("--n-queries", type=int, default=3, help="test digits to explain")
        p.add_argument("--top", type=int, default=3, help="samples listed per side")
        p.add_argument("--epochs", type=int, default=20, help="training epochs")
        p.add_argument("--random-state", type=int, default=0)

    bench = sub.add_parser(
        "benchmark", help="score every attribution method on a benchmark setting",
        description="Train the setting's model once, compute (or load cached) ground truth "
        "by retraining, run each attribution method and print LDS, LOO, mislabel AUC "
        "(on the -noisy variant), fit/transform seconds and peak memory.")
    bench.add_argument("setting", nargs="?", help="setting name, e.g. digits-lr (see --list)")
    bench.add_argument("--list", action="store_true", help="list settings and methods")
    bench.add_argument("--methods", nargs="+", metavar="METHOD",
                       help="methods to run (default: all that apply)")
    bench.add_argument("--output", metavar="JSON", help="write one record per method")
    bench.add_argument("--plot", metavar="PNG", help="bar chart per metric (matplotlib)")
    bench.add_argument("--n-subsets", type=int, default=None,
                       help="retrained models for LDS (at least 2; default: the setting's, "
                       "50, or 100 for mnist10-*)")
    bench.add_argument("--subset-fraction", type=float, default=0.5,
                       help="training fraction per LDS subset (default 0.5)")
    bench.add_argument("--n-loo", default="auto", type=_n_loo_arg,
                       help="leave-one-out removals; auto = 100 for sklearn models, "
                       "0 (skip) for neural nets")
    bench.add_argument("--no-auc", action="store_true",
                       help="skip mislabel detection on the -noisy variant")
    bench.add_argument("--n-train", type=int, default=None, help="training samples")
    bench.add_argument("--n-test", type=int, default=None, help="query samples")
    bench.add_argument("--n-checkpoints", type=int, default=5,
                       help="training checkpoints kept for TracIn (default 5)")
    bench.add_argument("--cache-dir", default=None,
                       help="ground-truth cache (default $SKDATTRI_CACHE or "
                       "~/.cache/skdattri)")
    bench.add_argument("--n-jobs", type=int, default=-1,
                       help="parallel retraining jobs (default -1 = all cores)")
    bench.add_argument("--threads", type=int, default=1,
                       help="torch/BLAS threads for training, retraining and the methods "
                       "(default 1: stable timings; 0 = leave the defaults)")
    bench.add_argument("--device", default=None, help="attributor device (default auto)")
    bench.add_argument("--random-state", type=int, default=0)
    bench.add_argument("--quiet", action="store_true",
                       help="no progress output (default: bars for training, retraining "
                       "and the methods on standard error)")
    bench.set_defaults(subparser=bench)
    add_retrain_parser(sub)
    return parser


def main(argv=None):
    """Entry point of ``python -m skdattri``."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command in (None, "demo"):
        return _demo(args)
    if args.command == "benchmark":
        return _benchmark(args, args.subparser)
    if args.command == "retrain":
        return retrain_command(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
